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
import redis

from .generator import GeneratorConfig, TransactionGenerator
from .ingest import Publisher
from .namespace import Namespace

DEMO_NAME = "fraudd_demo"


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


def run_demo(redis_url: str, postgres_url: str, transactions: int, workers: int, seed: int, echo) -> DemoResult:
    client = redis.Redis.from_url(redis_url, protocol=2)
    demo = Namespace(DEMO_NAME, redis_url, postgres_url)
    demo.drop(client)  # what an earlier demo left: every run starts from nothing
    env = dict(os.environ, **demo.environment())
    fraudd = [sys.executable, "-m", "fraudd"]
    subprocess.run([*fraudd, "migrate"], env=env, check=True, capture_output=True)

    rate = 2.0  # event-time transactions per second: the traffic spans the hours before now
    config = GeneratorConfig(seed=seed, start_ts=time.time() - transactions / rate, tx_per_second=rate)
    generated = TransactionGenerator(config).generate(transactions)
    faulty = generated.with_faults(duplicate_rate=0.01, invalid_rate=0.005, rng=np.random.default_rng(seed))
    sent = [p for p in faulty.payloads if p is not None]
    Publisher(client, demo.stream).publish(sent)
    invalid = sum(1 for p, r in zip(faulty.payloads, faulty.reason) if p is not None and r is not None)
    duplicates = int(faulty.is_duplicate.sum())
    echo(f"sent {len(sent):,} entries ({duplicates:,} producer duplicates, {invalid:,} invalid) to {demo.stream}")

    echo(f"fraudd run --workers {workers} ...")
    daemon = subprocess.Popen([*fraudd, "run", "--workers", str(workers)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not _drained(client, demo):
            if daemon.poll() is not None:
                raise RuntimeError(f"fraudd run exited early:\n{daemon.stderr.read()[-2000:]}")
            time.sleep(0.2)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        _out, stderr = daemon.communicate(timeout=60)
    return _summary(client, demo, generated, len(sent), duplicates, invalid, daemon.returncode)


def _drained(client: redis.Redis, demo: Namespace) -> bool:
    groups = client.xinfo_groups(demo.stream)
    return any(g["name"] == demo.group.encode() and g["pending"] == 0 and g["lag"] == 0 for g in groups)


def _summary(client: redis.Redis, demo: Namespace, generated, sent: int, duplicates: int, invalid: int,
             exit_code: int) -> DemoResult:
    decisions = dict(demo.sql("SELECT decision, count(*) FROM transactions GROUP BY 1"))
    first, last = demo.sql("SELECT min(scored_at), max(scored_at) FROM transactions")[0]
    flagged = {txid for (txid,) in demo.sql("SELECT transaction_id FROM transactions WHERE decision <> 'approve'")}
    fraud_ids = set(np.asarray(generated.transaction_id)[generated.is_fraud].tolist())
    caught = len(fraud_ids & flagged)
    reasons = Counter(fields[b"reason"].decode() for _id, fields in client.xrange(demo.dlq_stream))
    return DemoResult(
        sent=sent,
        duplicates_sent=duplicates,
        invalid_sent=invalid,
        rows=sum(decisions.values()),
        decisions={name: decisions.get(name, 0) for name in ("approve", "review", "decline")},
        dead_letters=dict(reasons),
        alerts=client.xlen(demo.fraud_stream),
        pending=client.xpending(demo.stream, demo.group)["pending"],
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
        f"  alerts               {result.alerts:,} on {DEMO_NAME}:transactions:fraud",
        "  dead letters         " + (", ".join(f"{r} {c}" for r, c in sorted(result.dead_letters.items())) or "none"),
        f"  fraud caught         recall {result.recall:.1%}, precision {result.precision:.1%} (against the generator's labels)",
        f"  rate                 {result.rate:,.0f} transactions/s (first to last commit, {result.seconds:.2f} s)",
        f"  pending after drain  {result.pending}",
        f"  exit code            {result.exit_code}",
        f"  check                {'every transaction scored exactly once' if result.consistent else 'MISMATCH: see the counts above'}",
        f"  rows: psql -d <db> -c 'SELECT * FROM {DEMO_NAME}.transactions LIMIT 5'",
    ]
    return "\n".join(lines)
