"""`fraudd run` end to end, as a real subprocess on the real Redis and PostgreSQL."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from fraudd.ingest import Publisher
from fraudd.schema import load_migrations
from fraudd.scoring import decode
from fraudd.scoring.settings import DEFAULT_MODEL

from .conftest import Namespace, wait_for, worker_pids
from .services import drain
from .streams import fully_drained

NOW = int(time.time())


def valid_payloads(count: int, prefix: str = "txn") -> list[bytes]:
    return [
        orjson.dumps(
            {
                "transaction_id": f"{prefix}_{i}",
                "user_id": f"user_{i % 700}",
                "amount": round(5 + (i * 7.31) % 900, 2),
                "merchant": ("Amazon", "Walmart", "Shell", "Uber", "Steam")[i % 5],
                "timestamp": NOW - 3600 + i % 3600,
            }
        )
        for i in range(count)
    ]


# One of each kind of bad input, with the reason the DLQ must record.
INVALID_KINDS: list[tuple[bytes, str]] = [
    (b"this is not json", decode.REASON_NOT_JSON),
    (b'{"transaction_id": "x1", "user_id": "u"', decode.REASON_NOT_JSON),
    (b"[1, 2, 3]", decode.REASON_NOT_OBJECT),
    (b'"just a string"', decode.REASON_NOT_OBJECT),
    (orjson.dumps({"user_id": "u", "amount": 3.0, "merchant": "m", "timestamp": NOW}), decode.REASON_MISSING),
    (
        orjson.dumps({"transaction_id": "bad_amount_type", "user_id": "u", "amount": "12.50", "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps({"transaction_id": "bad_amount_neg", "user_id": "u", "amount": -4, "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps({"transaction_id": 12345, "user_id": "u", "amount": 4, "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps({"transaction_id": "bad_ts", "user_id": "u", "amount": 4, "merchant": "m", "timestamp": "yesterday"}),
        decode.REASON_INVALID,
    ),
    (
        b'{"transaction_id": "nan_amount", "user_id": "u", "amount": NaN, "merchant": "m", "timestamp": 1764385200}',
        decode.REASON_NOT_JSON,
    ),
    (
        b'{"transaction_id": "big", "user_id": "u", "amount": 1, "merchant": "'
        + b"x" * (1 << 20)
        + b'", "timestamp": 1764385200}',
        decode.REASON_TOO_LARGE,
    ),
    (
        b'{"transaction_id": "\xff\xfe", "user_id": "u", "amount": 1, "merchant": "m", "timestamp": 1764385200}',
        decode.REASON_NOT_UTF8,
    ),
    (orjson.dumps({"transaction_id": "", "user_id": "u", "amount": 4, "merchant": "m", "timestamp": NOW}), decode.REASON_INVALID),
    (
        orjson.dumps({"transaction_id": "t" * 65, "user_id": "u", "amount": 4, "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps({"transaction_id": "bool_amount", "user_id": "u", "amount": True, "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (b'{"a":1},{"b":2}', decode.REASON_NOT_JSON),
    (
        orjson.dumps({"transaction_id": "crlf", "user_id": "u", "amount": 4, "merchant": "m\r\nBcc: x", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps(
            {"transaction_id": "c1", "user_id": "u", "amount": 4, "merchant": "m", "timestamp": NOW, "card_id": "c\x85"}
        ),
        decode.REASON_INVALID,
    ),
    (
        orjson.dumps({"transaction_id": "huge", "user_id": "u", "amount": 1e308, "merchant": "m", "timestamp": NOW}),
        decode.REASON_INVALID,
    ),
]


def dlq_entries(client: redis.Redis, ns: Namespace) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(ns.dlq_stream)]


def test_origin_producer_message_is_scored(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    # Byte for byte what the origin Go producer writes: XADD transactions:raw * data <json>.
    message = b'{"transaction_id":"txn_ab12","user_id":"user_x1","amount":512.3,"merchant":"Amazon","timestamp":%d}' % NOW
    redis_client.xadd(ns.stream, {"data": message})
    drain(redis_client, ns, tmp_path, "--workers", "1", timeout=30)
    rows = ns.sql(
        "SELECT transaction_id, user_id, amount, merchant, event_time, decision, score, model_version, reasons FROM transactions"
    )
    assert len(rows) == 1
    txid, user, amount, merchant, event_time, decision, score, version, reasons = rows[0]
    assert (txid, user, amount, merchant) == ("txn_ab12", "user_x1", 512.3, "Amazon")
    assert int(event_time.timestamp()) == NOW
    assert decision in ("approve", "review", "decline") and 0.0 <= score <= 1.0 and version
    assert isinstance(reasons, list)


def test_valid_and_invalid_entries_with_two_workers(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    invalid = [INVALID_KINDS[i % len(INVALID_KINDS)] for i in range(100)]
    payloads = valid_payloads(10_000)
    # Spread the bad entries through the stream so they share batches with good ones.
    mixed, expected_reasons = [], []
    step = len(payloads) // len(invalid)
    for i, payload in enumerate(payloads):
        mixed.append(payload)
        if i % step == 0 and len(expected_reasons) < len(invalid):
            bad, reason = invalid[len(expected_reasons)]
            mixed.append(bad)
            expected_reasons.append(reason)
    Publisher(redis_client, ns.stream).publish(mixed)

    drain(redis_client, ns, tmp_path, "--workers", "2", "--batch-size", "256")

    assert ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0] == (10_000, 10_000)
    dead = dlq_entries(redis_client, ns)
    assert sorted(d[b"reason"].decode() for d in dead) == sorted(expected_reasons)
    for letter in dead:
        assert {b"data", b"reason", b"detail", b"source_id", b"consumer", b"deliveries"} <= letter.keys()
    assert {d[b"data"] for d in dead if d[b"reason"] != b"payload_too_large"} <= {bad for bad, _ in INVALID_KINDS}
    assert redis_client.xpending(ns.stream, ns.group)["pending"] == 0
    # Every non-approved row is on the alert stream with the same decision, once.
    flagged = dict(ns.sql("SELECT transaction_id, decision FROM transactions WHERE decision <> 'approve'"))
    alerts = [orjson.loads(fields[b"data"]) for _id, fields in redis_client.xrange(ns.fraud_stream)]
    assert {a["transaction_id"]: a["decision"] for a in alerts} == flagged
    assert len(alerts) == len(flagged)


def test_killed_worker_is_respawned_and_nothing_is_lost(ns: Namespace, redis_client: redis.Redis) -> None:
    # The kill comes after the first 1,000 rows: the rest is the backlog the respawned worker meets.
    Publisher(redis_client, ns.stream).publish(valid_payloads(10_000, prefix="kill"))
    daemon = ns.start("--workers", "2", "--batch-size", "200", "--claim-idle-ms", "1000")
    try:
        wait_for(lambda: len(worker_pids(daemon.process.pid)) == 2, 30, message="two workers")
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 1000, 60, message="scoring to start")
        victim = worker_pids(daemon.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(worker_pids(daemon.process.pid)) == 2 and victim not in worker_pids(daemon.process.pid),
            30,
            message="the worker to be respawned",
        )
        wait_for(lambda: fully_drained(redis_client, ns), 120, message="the stream to drain")
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr[-3000:]
    assert '"worker_died"' in stderr
    assert ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0] == (10_000, 10_000)
    assert redis_client.xpending(ns.stream, ns.group)["pending"] == 0


def test_migrate_applies_every_migration_then_is_idempotent(redis_client: redis.Redis) -> None:
    """The command itself, on a schema of its own (the fixtures migrate in-process)."""
    ns = Namespace(f"t{uuid.uuid4().hex[:10]}")
    try:
        first = ns.fraudd("migrate")
        assert first.returncode == 0, first.stderr
        assert f"applied {', '.join(m.name for m in load_migrations())}" in first.stdout
        again = ns.fraudd("migrate")
        assert again.returncode == 0, again.stderr
        assert "up to date" in again.stdout
        assert ns.sql("SELECT count(*) FROM fraudd_schema_migrations")[0][0] == len(load_migrations())
    finally:
        ns.drop(redis_client)


def test_row_without_partition_does_not_fail(ns: Namespace) -> None:
    # Far in the future: no daily partition exists, the default one takes it, and creating the
    # day's partition later moves it out.
    ns.sql("""INSERT INTO transactions
                (transaction_id, user_id, amount, merchant, event_time, stream_id, score, decision, model_version)
              VALUES ('future', 'u', 1, 'm', '2099-01-01T12:00:00Z', '1-0', 0.1, 'approve', 'v') RETURNING 1""")
    assert ns.sql("SELECT count(*) FROM transactions_default")[0][0] == 1
    assert ns.sql("SELECT fraudd_ensure_partitions('2099-01-01', '2099-01-01')")[0][0] == 1
    assert ns.sql("SELECT count(*) FROM transactions_default")[0][0] == 0
    assert ns.sql("SELECT count(*) FROM transactions_20990101")[0][0] == 1


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--batch-size", "0"], {}, "--batch-size"),
        (["--redis-url", "redis://127.0.0.1:1/0"], {}, "--redis-url"),
        (["--postgres-url", "postgresql://127.0.0.1:1/test"], {}, "--postgres-url"),
        ([], {"ML_MODEL_PATH": "/nonexistent/model.onnx"}, "--model-path"),
        (["--workers", "-1"], {}, "--workers"),
    ],
)
def test_startup_errors_are_one_clear_line(ns: Namespace, args: list[str], env: dict[str, str], expected: str) -> None:
    result = ns.fraudd("run", *args, timeout=30, **env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert any(expected in line for line in lines), result.stderr
    assert len([line for line in lines if line.startswith("Error")]) == 1, result.stderr


def test_unmigrated_schema_is_refused(ns: Namespace) -> None:
    result = ns.fraudd("run", timeout=30, FRAUDD_PG_SCHEMA=f"{ns.schema}_empty")
    assert result.returncode != 0
    assert "fraudd migrate" in result.stderr and "Traceback" not in result.stderr


def test_worker_that_cannot_boot_halts_the_daemon(ns: Namespace, tmp_path) -> None:
    # The model is fine at start-up; it breaks while running, so the respawned worker cannot boot.
    model_path = tmp_path / "fraud.onnx"
    model_path.write_bytes(DEFAULT_MODEL.read_bytes())
    daemon = ns.start("--workers", "1", ML_MODEL_PATH=str(model_path))
    wait_for(lambda: len(worker_pids(daemon.process.pid)) == 1, 30, message="the worker")
    time.sleep(1.0)
    model_path.write_bytes(b"corrupted")
    os.kill(worker_pids(daemon.process.pid)[0], signal.SIGKILL)
    code, stderr = daemon.stop_when_exited(timeout=30)
    assert code == 3, stderr[-2000:]
    halted = [line for line in stderr.splitlines() if '"halted"' in line]
    assert len(halted) == 1 and "cannot start" in halted[0] and "not a loadable ONNX model" in halted[0]


def test_status_before_anything_was_produced(ns: Namespace) -> None:
    status = ns.fraudd("status")
    assert status.returncode == 0, status.stdout
    assert "redis      up" in status.stdout and "lag 0, pending 0" in status.stdout, status.stdout
