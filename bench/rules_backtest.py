"""``python -m bench rules-backtest``: `fraudd rules test` on N stored decisions, and what storing
the feature vectors costs.

Fills a fresh schema with N decisions over the last 30 days, each with a feature vector drawn from
plausible distributions and decided by the packaged rules (as a worker would have), a share of
them labelled; then times `fraudd rules test` for a candidate that adds one rule, and measures what it holds at
its peak (traced by tracemalloc) against the size of the window's records. Beside it: the COPY cost of
the ``features`` column (the same rows copied with and without it), the client time to format it,
and its size on disk per transaction.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import psycopg

from bench.namespace import Namespace
from fraudd.rulesets import backtest
from fraudd.schema import connect
from fraudd.scoring import vectors
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.rules import DECISIONS, Rules
from fraudd.scoring.settings import DEFAULT_RULES

CANDIDATE_RULE = (
    '\n[[rule]]\ncode = "R_BENCH_LARGE"\nreason = "large"\naction = "review"\nfeature = "amount"\nop = ">="\nvalue = 2000\n'
)
_CHUNK = 100_000
_DAY_MS = 86_400_000


def synthetic(rng: np.random.Generator, n: int, now_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, amount, event_ms) of ``n`` plausible decisions."""
    out = np.zeros((n, len(vectors.VECTOR_COLUMNS)), dtype=np.float32)
    amount = np.round(rng.lognormal(3.5, 1.2, n), 2)
    column = {name: j for j, name in enumerate(vectors.VECTOR_COLUMNS)}
    for name in FEATURE_NAMES:
        out[:, column[name]] = rng.poisson(1.5, n)
    out[:, column["log_amount"]] = np.log1p(amount)
    out[:, column["amount_to_mean"]] = rng.lognormal(0, 0.8, n)
    out[:, column["blocked_merchant"]] = rng.random(n) < 0.002
    out[:, column[vectors.MODEL_DECISION]] = np.where(rng.random(n) < 0.02, 1, 0) + (rng.random(n) < 0.003)
    event_ms = now_ms - rng.integers(0, 30 * _DAY_MS - 3_600_000, n)
    return out, amount, event_ms


def _copy_text(
    offset: int, vec: np.ndarray, amount: np.ndarray, event_ms: np.ndarray, decision: np.ndarray, features: bool
) -> bytes:
    n = len(vec)
    ids = [f"bt_{i}" for i in range(offset, offset + n)]
    times = np.datetime_as_string(event_ms.astype("datetime64[ms]"), unit="ms").tolist()
    columns = [
        ids,
        ids,
        list(map(repr, amount.tolist())),
        ["m"] * n,
        times,
        ids,
        ["0.1"] * n,
        [DECISIONS[d] for d in decision.tolist()],
        ["bench"] * n,
        ["1"] * n,
    ]
    if features:
        columns.append(vectors.copy_text(vec))
    return ("\n".join(map("\t".join, zip(*columns))) + "\n").encode()


_COLUMNS = "transaction_id, user_id, amount, merchant, event_time, stream_id, score, decision, model_version, rules_version"


def run(redis_url: str, postgres_url: str, n: int, seed: int, echo) -> dict:
    ns = Namespace.fresh("rules", redis_url, postgres_url)
    ns.migrate()
    rng = np.random.default_rng(seed)
    live = Rules.load(DEFAULT_RULES)
    candidate = Rules.from_bytes(DEFAULT_RULES.read_bytes() + CANDIDATE_RULE.encode(), version="candidate")
    now_ms = int(time.time() * 1000)
    copy_s = {True: 0.0, False: 0.0}
    format_s = 0.0
    try:
        with connect(postgres_url, ns.schema, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            conn.execute("SELECT fraudd_ensure_partitions(current_date - 31, current_date)")
            # The COPY cost of the column, measured on two identical tables that differ only by it.
            for table in ("with_features", "without_features"):
                conn.execute(f"CREATE TEMP TABLE {table} (LIKE transactions INCLUDING DEFAULTS INCLUDING INDEXES)")
            echo(f"storing {n} decisions in {ns.schema} …")
            for offset in range(0, n, _CHUNK):
                vec, amount, event_ms = synthetic(rng, min(_CHUNK, n - offset), now_ms)
                features, by_model = vectors.unpack(vec, amount)
                decision = np.maximum(by_model, live.evaluate(features).action)
                started = time.perf_counter()
                vectors.copy_text(vec)
                format_s += time.perf_counter() - started
                for with_features, table in ((True, "with_features"), (False, "without_features")):
                    data = _copy_text(offset, vec, amount, event_ms, decision, with_features)
                    columns = _COLUMNS + (", features" if with_features else "")
                    started = time.perf_counter()
                    with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        copy.write(data)
                    copy_s[with_features] += time.perf_counter() - started
                conn.execute("INSERT INTO transactions SELECT * FROM with_features")
                conn.execute("TRUNCATE with_features, without_features")
            conn.execute(
                """INSERT INTO labels (transaction_id, label, reported_at)
                   SELECT transaction_id, CASE WHEN decision <> 'approve' AND random() < 0.5 THEN 'fraud' ELSE 'legit' END, now()
                   FROM transactions TABLESAMPLE BERNOULLI (2)"""
            )
            conn.execute("ANALYZE transactions")
            column_bytes, row_bytes = conn.execute(
                """SELECT avg(pg_column_size(features)), avg(pg_column_size(t.*)) FROM transactions t"""
            ).fetchone()

            started = time.perf_counter()
            report = backtest.test(postgres_url, ns.schema, candidate, 30 * 86400, 5.0)
            tested = time.perf_counter()
            # A second run traced: what the test holds at its peak, against the window's records.
            tracemalloc.start()
            backtest.test(postgres_url, ns.schema, candidate, 30 * 86400, 5.0)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{ns.schema}" CASCADE')
    return {
        "transactions": report["transactions"],
        "total_s": round(tested - started, 2),
        "peak_traced_mb": round(peak / 1e6, 1),
        "records_mb": round(report["transactions"] * backtest.RECORD_BYTES / 1e6, 1),
        "changed": report["changed"],
        "features_bytes_per_row": round(float(column_bytes), 1),
        "row_bytes": round(float(row_bytes), 1),
        "copy_us_per_row_with_features": round(copy_s[True] / n * 1e6, 2),
        "copy_us_per_row_without_features": round(copy_s[False] / n * 1e6, 2),
        "format_us_per_row": round(format_s / n * 1e6, 2),
    }
