"""``python -m bench copy-indexes``: PostgreSQL's own CPU and WAL per row of the workers' COPY, by index.

The workers' binary COPY (``sinks._copy_binary``) of batches of scored transactions, with their
feature vectors, goes alternately into a heap without indexes, the same heap with the first one,
two, … of the indexes ``transactions`` carries (as migrated, primary key first, read from the
catalog so the figures follow the schema), and ``transactions`` itself. The server process's CPU is
read from ``/proc/<pid>/schedstat`` around each COPY, so what the client and the rest of the box
spend stays out of it; WAL bytes are the server's WAL position moved by each COPY, which counts only
this COPY on a private server (``--private-services``). It prices each index the table carries
against the exactly-once and console queries that need it (bench/RESULTS.md).

``after_checkpoint`` prices what the first change of a page after each checkpoint costs: the whole
page in the WAL (``full_page_writes``). Every COPY then follows a CHECKPOINT, as the COPYs of the
first moments after each checkpoint of a server do; ``preload`` rows stored in each table first
make its indexes big enough that a batch's random keys land on pages of their own, as in a day's
partition that already holds millions of rows.
"""

from __future__ import annotations

import re
import time

import psycopg
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

# The indexes of ``transactions`` (its partitions' are made from these), primary key first.
_INDEXES = """SELECT c.relname, pg_get_indexdef(i.indexrelid)
              FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = 'transactions'::regclass ORDER BY NOT i.indisprimary, c.oid"""


def generated_scored_batch(ns: Namespace, client: redis.Redis, rows: int) -> ScoredBatch:
    """``rows`` generated transactions of the last hours, scored as a worker scores them."""
    now = time.time()
    generated = TransactionGenerator(GeneratorConfig(seed=5, start_ts=now - 3 * 3600, tx_per_second=50.0, n_users=100_000))
    batch = decode_batch([f"{int(now * 1000)}-{i}" for i in range(rows)], generated.generate(rows).payloads())
    features = SharedFeatureStore(client, Keys(ns.stream, ns.fraud_stream, ns.dlq_stream), 3_600_000).compute(batch)
    model, rules = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES), Rules.load(DEFAULT_RULES)
    decided = score_batch(model, rules, features, model.review_threshold, model.decline_threshold)
    return scored_batch(batch, features, decided, model.version, rules.version)


def _tables(conn: psycopg.Connection) -> dict[str, str]:
    """Label -> table: a heap, the heap with each prefix of transactions' indexes (all of them the
    last), then transactions itself, whose partitioning is what it adds to the last."""
    indexes = conn.execute(_INDEXES).fetchall()
    tables = {"no index": "copy_heap_0"}
    conn.execute("CREATE TABLE copy_heap_0 (LIKE transactions INCLUDING DEFAULTS)")
    for k in range(1, len(indexes) + 1):
        table = f"copy_heap_{k}"
        conn.execute(f"CREATE TABLE {table} (LIKE transactions INCLUDING DEFAULTS)")
        for _, definition in indexes[:k]:
            # The parent's definition (partitioned or a hypertable), made on the plain table under a
            # name of its own.
            on_table = re.sub(r" ON (ONLY )?\S+ ", f" ON {table} ", definition, count=1)
            conn.execute(re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ", r"CREATE \1INDEX ", on_table))
        tables[" + ".join(name for name, _ in indexes[:k])] = table
    tables["transactions (partitioned, all of them)"] = "transactions"
    return tables


def run(
    redis_url: str, postgres_url: str, rows: int, rounds: int, echo, after_checkpoint: bool = False, preload: int = 0
) -> dict:
    """Server CPU, wall time and WAL bytes per row of ``rounds`` COPYs of ``rows`` new rows into each table, alternating."""
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
            tables = _tables(conn)
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            for table in tables.values():
                for r in range(preload // rows):
                    with conn.cursor().copy(f"COPY {table} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(payload(f"-{table}-preload-{r}"))
            data = {label: [payload(f"-{table}-{r}") for r in range(rounds)] for label, table in tables.items()}
            cpu_s = dict.fromkeys(tables, 0.0)
            wall_s = dict.fromkeys(tables, 0.0)
            wal_bytes = dict.fromkeys(tables, 0)
            for r in range(rounds):
                for label in tables if r % 2 == 0 else reversed(tables):
                    if after_checkpoint:
                        conn.execute("CHECKPOINT")
                    lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
                    before, started = procstat.run_s(backend), time.perf_counter()
                    with conn.cursor().copy(f"COPY {tables[label]} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(data[label][r])
                    wall_s[label] += time.perf_counter() - started
                    cpu_s[label] += procstat.run_s(backend) - before
                    wal_bytes[label] += int(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (lsn,)).fetchone()[0])  # type: ignore[index]
            width = conn.execute("SELECT avg(pg_column_size(t.*)) FROM copy_heap_0 t").fetchone()[0]  # type: ignore[index]
            echo(f"  {rounds} COPYs of {rows:,} rows into each table" + (", each after a CHECKPOINT" if after_checkpoint else ""))
    finally:
        ns.drop(client)
        client.close()
    n = rows * rounds
    return {
        "rows": rows,
        "rounds": rounds,
        "after_checkpoint": after_checkpoint,
        "preload": preload,
        "row_bytes": round(float(width), 1),
        "payload_bytes_per_row": round(len(data["no index"][0]) / rows, 1),
        "server_cpu_us_per_row": {label: round(cpu_s[label] / n * 1e6, 2) for label in tables},
        "wall_us_per_row": {label: round(wall_s[label] / n * 1e6, 2) for label in tables},
        "wal_bytes_per_row": {label: round(wal_bytes[label] / n) for label in tables},
    }


def format_result(result: dict) -> str:
    cpu, wall, wal = result["server_cpu_us_per_row"], result["wall_us_per_row"], result["wal_bytes_per_row"]
    lines = [
        f"COPY of {result['rounds']} × {result['rows']:,} scored transactions into each table holding "
        f"{result['preload']:,} rows, alternating{', each after a CHECKPOINT' if result['after_checkpoint'] else ''} "
        f"(rows of {result['row_bytes']} bytes, {result['payload_bytes_per_row']} bytes of COPY each):"
    ]
    lines += [
        f"  server CPU {cpu[label]:5.2f} µs/row   wall {wall[label]:5.2f} µs/row   WAL {wal[label]:5d} B/row   {label}"
        for label in cpu
    ]
    return "\n".join(lines)
