"""``fraudd demo``: the whole pipeline on the local Redis and PostgreSQL, in a few seconds.

Generated traffic (with producer duplicates and invalid entries mixed in) goes onto a demo stream;
a real ``fraudd run`` drains it; the summary then reads the outcome back from PostgreSQL and the
output streams and checks it against what was sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import psycopg
import redis

from .generator import GeneratorConfig, TransactionGenerator
from .ingest import Publisher
from .keys import Keys

DEMO_SCHEMA = "fraudd_demo"
DEMO_STREAMS = Keys("demo:transactions:raw", "demo:transactions:fraud", "demo:transactions:dlq")
DEMO_GROUP = "fraud-demo"


@dataclass
class DemoResult:
    sent: int
    duplicates_sent: int
    invalid_sent: int
    rows: int
    decisions: dict[str, int]
    dead_letters: dict[str, int]
    alerts: int
    pending: int
    seconds: float
    recall: float
    precision: float
    exit_code: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def consistent(self) -> bool:
        expected_rows = self.sent - self.duplicates_sent - self.invalid_sent
        return (self.rows == expected_rows and sum(self.dead_letters.values()) == self.invalid_sent
                and self.pending == 0 and self.exit_code == 0)


def reset(client: redis.Redis, postgres_url: str) -> None:
    """Remove what an earlier demo left, so every run starts from nothing."""
    keys = [DEMO_STREAMS.stream, DEMO_STREAMS.fraud_stream, DEMO_STREAMS.dlq_stream]
    keys += list(client.scan_iter(match=f"{DEMO_STREAMS.prefix}*", count=10_000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{DEMO_SCHEMA}" CASCADE')


def run_demo(redis_url: str, postgres_url: str, transactions: int, workers: int, seed: int, echo) -> DemoResult:
    client = redis.Redis.from_url(redis_url, protocol=2)
    reset(client, postgres_url)
    env = dict(os.environ, REDIS_URL=redis_url, POSTGRES_URL=postgres_url, FRAUDD_PG_SCHEMA=DEMO_SCHEMA,
               FRAUDD_STREAM=DEMO_STREAMS.stream, FRAUDD_FRAUD_STREAM=DEMO_STREAMS.fraud_stream,
               FRAUDD_DLQ_STREAM=DEMO_STREAMS.dlq_stream, CONSUMER_GROUP=DEMO_GROUP, CONSUMER_ID="demo")
    fraudd = [sys.executable, "-m", "fraudd"]
    subprocess.run([*fraudd, "migrate"], env=env, check=True, capture_output=True)

    rate = 2.0  # event-time transactions per second: the traffic spans the hours before now
    config = GeneratorConfig(seed=seed, start_ts=time.time() - transactions / rate, tx_per_second=rate)
    generated = TransactionGenerator(config).generate(transactions)
    faulty = generated.with_faults(duplicate_rate=0.01, invalid_rate=0.005, rng=np.random.default_rng(seed))
    sent = [p for p in faulty.payloads if p is not None]
    Publisher(client, DEMO_STREAMS.stream).publish(sent)
    invalid = sum(1 for p, r in zip(faulty.payloads, faulty.reason) if p is not None and r is not None)
    duplicates = int(faulty.is_duplicate.sum())
    echo(f"sent {len(sent):,} entries ({duplicates:,} producer duplicates, {invalid:,} invalid) to {DEMO_STREAMS.stream}")

    echo(f"fraudd run --workers {workers} ...")
    daemon = subprocess.Popen([*fraudd, "run", "--workers", str(workers)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not _drained(client):
            if daemon.poll() is not None:
                raise RuntimeError(f"fraudd run exited early:\n{daemon.stderr.read()[-2000:]}")
            time.sleep(0.2)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        _out, stderr = daemon.communicate(timeout=60)
    return _summary(client, postgres_url, generated, len(sent), duplicates, invalid, daemon.returncode)


def _drained(client: redis.Redis) -> bool:
    groups = client.xinfo_groups(DEMO_STREAMS.stream)
    return any(g["name"] == DEMO_GROUP.encode() and g["pending"] == 0 and g["lag"] == 0 for g in groups)


def _summary(client: redis.Redis, postgres_url: str, generated, sent: int, duplicates: int, invalid: int,
             exit_code: int) -> DemoResult:
    with psycopg.connect(postgres_url) as conn:
        conn.execute(f'SET search_path TO "{DEMO_SCHEMA}"')
        decisions = dict(conn.execute("SELECT decision, count(*) FROM transactions GROUP BY 1").fetchall())
        first, last = conn.execute("SELECT min(scored_at), max(scored_at) FROM transactions").fetchone()
        flagged = {txid for (txid,) in conn.execute("SELECT transaction_id FROM transactions WHERE decision <> 'approve'")}
    fraud_ids = set(np.asarray(generated.transaction_id)[generated.is_fraud].tolist())
    caught = len(fraud_ids & flagged)
    reasons = Counter(fields[b"reason"].decode() for _id, fields in client.xrange(DEMO_STREAMS.dlq_stream))
    return DemoResult(
        sent=sent,
        duplicates_sent=duplicates,
        invalid_sent=invalid,
        rows=sum(decisions.values()),
        decisions={name: decisions.get(name, 0) for name in ("approve", "review", "decline")},
        dead_letters=dict(reasons),
        alerts=client.xlen(DEMO_STREAMS.fraud_stream),
        pending=client.xpending(DEMO_STREAMS.stream, DEMO_GROUP)["pending"],
        seconds=(last - first).total_seconds() if first else 0.0,
        recall=caught / len(fraud_ids) if fraud_ids else 0.0,
        precision=caught / len(flagged) if flagged else 0.0,
        exit_code=exit_code,
    )


def format_summary(result: DemoResult) -> str:
    lines = [
        "",
        "fraudd demo summary",
        f"  transactions scored  {result.rows:,}  (sent {result.sent:,} = scored + {result.duplicates_sent:,} duplicates "
        f"+ {result.invalid_sent:,} invalid)",
        "  decisions            " + ", ".join(f"{name} {count:,}" for name, count in result.decisions.items()),
        f"  alerts               {result.alerts:,} on {DEMO_STREAMS.fraud_stream}",
        "  dead letters         " + (", ".join(f"{r} {c}" for r, c in sorted(result.dead_letters.items())) or "none"),
        f"  fraud caught         recall {result.recall:.1%}, precision {result.precision:.1%} (against the generator's labels)",
        f"  rate                 {result.rate:,.0f} transactions/s (first to last commit, {result.seconds:.2f} s)",
        f"  pending after drain  {result.pending}",
        f"  exit code            {result.exit_code}",
        f"  check                {'every transaction scored exactly once' if result.consistent else 'MISMATCH: see the counts above'}",
        f"  rows: psql -d <db> -c 'SELECT * FROM {DEMO_SCHEMA}.transactions LIMIT 5'",
    ]
    return "\n".join(lines)
