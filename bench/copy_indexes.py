"""``python -m bench copy-indexes``: PostgreSQL's own CPU per row of the workers' COPY, by index.

The workers' binary COPY (``sinks._copy_binary``) of batches of scored transactions, with their
feature vectors, goes alternately into a heap without indexes, the same with the primary key only,
and ``transactions`` as migrated; the server process's CPU is read from ``/proc`` around each COPY,
so what the client and the rest of the box spend stays out of it. It prices each index the table
carries against the exactly-once and console queries that need it (bench/RESULTS.md).
"""

from __future__ import annotations

import time

import redis

from bench import procstat
from bench.namespace import Namespace
from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import Keys
from fraudd.schema import connect
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.model import FraudModel
from fraudd.scoring.rules import Rules
from fraudd.scoring.settings import DEFAULT_MODEL, DEFAULT_RULES
from fraudd.scoring.sinks import _COLUMN_LIST, ScoredBatch, _copy_binary
from fraudd.scoring.worker import score_batch, scored_batch

TABLES = {
    "no index": "copy_heap",
    "primary key only": "copy_pk",
    "transactions": "transactions",
}


def generated_scored_batch(ns: Namespace, client: redis.Redis, rows: int) -> ScoredBatch:
    """``rows`` generated transactions of the last hours, scored as a worker scores them."""
    now = time.time()
    generated = TransactionGenerator(GeneratorConfig(seed=5, start_ts=now - 3 * 3600, tx_per_second=50.0, n_users=100_000))
    batch = decode_batch([f"{int(now * 1000)}-{i}" for i in range(rows)], generated.generate(rows).payloads())
    features = SharedFeatureStore(client, Keys(ns.stream, ns.fraud_stream, ns.dlq_stream), 3_600_000).compute(batch)
    model, rules = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES), Rules.load(DEFAULT_RULES)
    decided = score_batch(model, rules, features, model.review_threshold, model.decline_threshold)
    return scored_batch(batch, features, decided, model.version, rules.version)


def run(redis_url: str, postgres_url: str, rows: int, rounds: int, echo) -> dict:
    """Server CPU and wall time per row of ``rounds`` COPYs of ``rows`` new rows into each table, alternating."""
    ns = Namespace.fresh("copy_indexes", redis_url, postgres_url)
    client = redis.Redis.from_url(redis_url, protocol=2)
    try:
        ns.migrate()
        scored = generated_scored_batch(ns, client, rows)

        def payload(tag: str) -> bytes:
            part = scored.take(range(rows))
            part.batch.transaction_id = [t + tag for t in part.batch.transaction_id]
            return _copy_binary([part])

        with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute("CREATE TABLE copy_heap (LIKE transactions INCLUDING DEFAULTS)")
            conn.execute("CREATE TABLE copy_pk (LIKE transactions INCLUDING DEFAULTS, PRIMARY KEY (transaction_id, event_time))")
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            data = {label: [payload(f"-{table}-{r}") for r in range(rounds)] for label, table in TABLES.items()}
            cpu_s = dict.fromkeys(TABLES, 0.0)
            wall_s = dict.fromkeys(TABLES, 0.0)
            for r in range(rounds):
                for label in TABLES if r % 2 == 0 else reversed(TABLES):
                    before, started = procstat.read(backend), time.perf_counter()
                    with conn.cursor().copy(f"COPY {TABLES[label]} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(data[label][r])
                    wall_s[label] += time.perf_counter() - started
                    after = procstat.read(backend)
                    assert before is not None and after is not None
                    cpu_s[label] += after.cpu_s - before.cpu_s
            echo(f"  {rounds} COPYs of {rows:,} rows into each table")
    finally:
        ns.drop(client)
        client.close()
    n = rows * rounds
    return {
        "rows": rows,
        "rounds": rounds,
        "server_cpu_us_per_row": {label: round(cpu_s[label] / n * 1e6, 2) for label in TABLES},
        "wall_us_per_row": {label: round(wall_s[label] / n * 1e6, 2) for label in TABLES},
    }


def format_result(result: dict) -> str:
    cpu, wall = result["server_cpu_us_per_row"], result["wall_us_per_row"]
    lines = [f"COPY of {result['rounds']} × {result['rows']:,} scored transactions into each table, alternating:"]
    lines += [f"  {label:18s} server CPU {cpu[label]:5.2f} µs/row   wall {wall[label]:5.2f} µs/row" for label in TABLES]
    return "\n".join(lines)
