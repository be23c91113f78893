"""Exactly-once under failure, one failure at a time: each test provokes one and checks the outcome.

Tests that take Redis or PostgreSQL away run their own servers (tests/services.py); the others use
the shared ones through the ``ns`` fixture. Nothing here mocks Redis or PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import pytest
import redis

from fraudd.keys import Keys
from fraudd.runtime.deadletters import REASON_MAX_DELIVERIES
from fraudd.runtime.health import Housekeeper
from fraudd.schema import connect
from fraudd.scoring import decode
from fraudd.scoring.features import LIBRARY_NAME, stored_states
from fraudd.settings import ConsumerSettings, PostgresSettings, RedisSettings

from .conftest import Namespace, wait_for, worker_pids
from .services import PostgresServer, RedisServer, alive, dedicated_namespace, drain, start, stop
from .streams import alerts, dlq, fully_drained, group, payload, pending_deliveries, publish, valid_payloads


def keys_of(ns: Namespace) -> Keys:
    return Keys(ns.stream, ns.fraud_stream, ns.dlq_stream)


def rows(ns: Namespace) -> tuple[int, int]:
    return ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0]


def user_count(client: redis.Redis, ns: Namespace, user: str) -> int:
    """How many transactions the behaviour state has counted for ``user`` (the state's ``n``)."""
    raw = stored_states(client, keys_of(ns), [user])[0]
    return 0 if raw is None else struct.unpack_from("<dI", raw)[1]


def libraries(client: redis.Redis) -> list[bytes]:
    """Names of the Function libraries loaded (RESP2: each library is a flat field/value list)."""
    return [dict(zip(lib[::2], lib[1::2]))[b"library_name"] for lib in client.function_list()]


# -- pending recovery --------------------------------------------------------------------------


def test_entries_a_dead_consumer_left_pending_are_reclaimed(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    ids = publish(redis_client, ns.stream, valid_payloads(60, "ghost"))
    redis_client.xgroup_create(ns.stream, ns.group, id="0")
    # A consumer that read 40 entries and died without acking them.
    redis_client.xreadgroup(ns.group, "ghost", {ns.stream: ">"}, count=40)
    assert len(pending_deliveries(redis_client, ns)) == 40

    log = drain(redis_client, ns, tmp_path, "--workers", "1", "--claim-idle-ms", "1000")
    assert '"reclaimed"' in log
    assert rows(ns) == (60, 60)
    assert set(r[0] for r in ns.sql("SELECT stream_id FROM transactions")) == set(ids)
    ghost = next(c for c in redis_client.xinfo_consumers(ns.stream, ns.group) if c["name"] == b"ghost")
    assert ghost["pending"] == 0


def test_housekeeper_removes_gone_consumers_that_own_nothing(
    ns: Namespace, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = ConsumerSettings(ns.stream, ns.group, f"{ns.name}-c", workers=2, claim_idle_ms=50)
    publish(redis_client, ns.stream, valid_payloads(1, "hk"))
    redis_client.xgroup_create(ns.stream, ns.group, id="0")
    redis_client.xgroup_createconsumer(ns.stream, ns.group, "gone-empty")
    redis_client.xreadgroup(ns.group, "gone-holding", {ns.stream: ">"}, count=1)
    redis_client.xgroup_createconsumer(ns.stream, ns.group, consumer.consumer_name(1))  # ours, idle
    # The production threshold is a minute of idleness; the rule, not the minute, is under test.
    monkeypatch.setattr("fraudd.runtime.health.GONE_CONSUMER_MIN_IDLE_MS", 0)
    time.sleep(0.2)
    Housekeeper(RedisSettings(ns.redis_url), PostgresSettings(ns.postgres_url, ns.schema), consumer, [ns.stream]).run_once()
    names = {c["name"].decode() for c in redis_client.xinfo_consumers(ns.stream, ns.group)}
    # Gone and owning nothing: removed. Owning a pending entry: kept for XAUTOCLAIM. Ours: kept.
    assert names == {"gone-holding", consumer.consumer_name(1)}


# -- poison and bisection ----------------------------------------------------------------------


def test_entry_delivered_too_often_is_dead_lettered_as_poison(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    payloads = valid_payloads(5, "poison")
    ids = publish(redis_client, ns.stream, payloads)
    redis_client.xgroup_create(ns.stream, ns.group, id="0")
    redis_client.xreadgroup(ns.group, "crasher", {ns.stream: ">"}, count=2)
    # These two already took down 7 consumers (as far as the group knows).
    redis_client.execute_command("XCLAIM", ns.stream, ns.group, "crasher", 0, ids[0], ids[1], "RETRYCOUNT", 7)

    drain(redis_client, ns, tmp_path, "--workers", "1", "--claim-idle-ms", "500", "--max-deliveries", "3")
    letters = dlq(redis_client, ns)
    assert sorted(d["source_id"].decode() for d in letters) == sorted(ids[:2])
    for letter in letters:
        assert letter["reason"].decode() == REASON_MAX_DELIVERIES
        assert int(letter["deliveries"]) > 3
        assert letter["data"] == payloads[ids.index(letter["source_id"].decode())]
    assert sorted(r[0] for r in ns.sql("SELECT stream_id FROM transactions")) == sorted(ids[2:])


def test_failing_batch_is_bisected_down_to_the_bad_entry(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    payloads = valid_payloads(100, "bisect", users=10)
    # A valid message that the database refuses (here an operator's constraint): the COPY fails.
    with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
        conn.execute("ALTER TABLE transactions ADD CONSTRAINT no_evil_corp CHECK (merchant <> 'Evil Corp')")
    bad = payload("bisect_evil", user="bisect_user_3", merchant="Evil Corp")
    payloads.insert(37, bad)
    ids = publish(redis_client, ns.stream, payloads)
    log = drain(redis_client, ns, tmp_path, "--workers", "1", "--batch-size", "200")
    assert '"batch_bisected"' in log
    assert rows(ns) == (100, 100)
    letters = dlq(redis_client, ns)
    assert [(d["source_id"].decode(), d["reason"].decode(), d["data"]) for d in letters] == [
        (ids[37], decode.REASON_PROCESSING, bad)
    ]
    # The retries of the halves did not count anyone twice.
    for u in range(10):
        expected = sum(1 for i in range(100) if i % 10 == u) + (1 if u == 3 else 0)
        assert user_count(redis_client, ns, f"bisect_user_{u}") == expected


# -- duplicates --------------------------------------------------------------------------------


def test_producer_duplicates_give_one_row_one_alert_one_count(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    a, b, c = (payload(f"dup_{k}", user="dup_user", amount=100.0 + k, ts=time.time() - 100 + k) for k in range(3))
    # a twice in one batch, b once; later a, b and c again, seconds apart.
    publish(redis_client, ns.stream, [a, b, a])
    # A review threshold near 0 flags everything, so every transaction must alert exactly once.
    daemon = start(ns, tmp_path, "--workers", "2", "--review-threshold", "0.000001", "--decline-threshold", "0.999999")
    try:
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the first batch")
        assert rows(ns) == (2, 2)
        time.sleep(2)
        publish(redis_client, ns.stream, [b, a, c, c])
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the duplicates")
    finally:
        stop(daemon)
    assert rows(ns) == (3, 3)
    flagged = [x["transaction_id"] for x in alerts(redis_client, ns)]
    assert sorted(flagged) == ["dup_0", "dup_1", "dup_2"]
    decisions = dict(ns.sql("SELECT transaction_id, decision FROM transactions"))
    assert {x["transaction_id"]: x["decision"] for x in alerts(redis_client, ns)} == decisions
    assert user_count(redis_client, ns, "dup_user") == 3
    assert dlq(redis_client, ns) == []


# -- PostgreSQL away ---------------------------------------------------------------------------


def _assert_held_back(client: redis.Redis, ns: Namespace, published_while_down: int, batch: int, workers: int) -> None:
    """Nothing of what was published during the outage is acked, and at most one batch per worker is read."""
    info = group(client, ns)
    assert info is not None
    pending = pending_deliveries(client, ns)
    assert len(pending) <= batch * workers
    assert len(pending) + info["lag"] == published_while_down  # none of them acked
    assert set(pending.values()) == {1}  # not reclaimed from the waiting worker, not re-read


def test_postgres_down_nothing_acked_then_resumes(
    dedicated_redis: RedisServer, dedicated_postgres: PostgresServer, tmp_path: Path
) -> None:
    ns = dedicated_namespace(dedicated_redis, dedicated_postgres.url)
    client = dedicated_redis.client()
    publish(client, ns.stream, valid_payloads(1000, "before"))
    daemon = start(ns, tmp_path, "--workers", "2", "--batch-size", "100", "--claim-idle-ms", "1000")
    try:
        wait_for(lambda: fully_drained(client, ns), 60, message="the first entries")
        dedicated_postgres.stop("immediate")
        try:
            publish(client, ns.stream, valid_payloads(2000, "during"))
            # Three claim-idle periods and back-off steps longer than one: the waiting workers
            # must keep their batches, and the other worker must not take them over.
            time.sleep(2.0)
            _assert_held_back(client, ns, 2000, batch=100, workers=2)
            time.sleep(3.0)
            _assert_held_back(client, ns, 2000, batch=100, workers=2)
            status = ns.fraudd("status")
            assert status.returncode == 1
            assert "postgres   DOWN" in status.stdout and "redis      up" in status.stdout, status.stdout
            assert daemon.process.poll() is None  # the supervisor waits it out, no crash loop
        finally:
            dedicated_postgres.start()
        wait_for(lambda: fully_drained(client, ns), 60, message="the backlog after PostgreSQL came back")
        assert ns.fraudd("status").returncode == 0
    finally:
        log = stop(daemon)
    assert rows(ns) == (3000, 3000)
    assert '"outage"' in log and '"recovered"' in log
    assert '"reclaimed"' not in log and '"worker_died"' not in log and '"halted"' not in log
    assert dlq(client, ns) == []


def test_postgres_read_only_nothing_acked_then_resumes(
    dedicated_redis: RedisServer, dedicated_postgres: PostgresServer, tmp_path: Path
) -> None:
    ns = dedicated_namespace(dedicated_redis, dedicated_postgres.url)
    client = dedicated_redis.client()
    daemon = start(ns, tmp_path, "--workers", "1", "--batch-size", "100")
    try:
        wait_for(lambda: group(client, ns) is not None and '"worker_started"' in daemon.log(), 30, message="the worker")
        dedicated_postgres.set_read_only(True)
        try:
            publish(client, ns.stream, valid_payloads(500, "ro"))
            time.sleep(3.0)
            _assert_held_back(client, ns, 500, batch=100, workers=1)
        finally:
            dedicated_postgres.set_read_only(False)
        wait_for(lambda: fully_drained(client, ns), 60, message="the backlog after PostgreSQL took writes again")
    finally:
        log = stop(daemon)
    assert rows(ns) == (500, 500)
    assert "read-only transaction" in log
    assert dlq(client, ns) == []


# -- Redis away --------------------------------------------------------------------------------


def test_redis_restart_that_lost_everything_reloads_function_and_group(
    volatile_redis: RedisServer, dedicated_postgres: PostgresServer, tmp_path: Path
) -> None:
    ns = dedicated_namespace(volatile_redis, dedicated_postgres.url)
    client = volatile_redis.client()
    publish(client, ns.stream, valid_payloads(500, "first"))
    daemon = start(ns, tmp_path, "--workers", "2", "--batch-size", "100")
    try:
        wait_for(lambda: fully_drained(client, ns), 60, message="the first entries")
        volatile_redis.restart(down_s=1.0)
        assert libraries(client) == []  # the server came back empty
        wait_for(lambda: group(client, ns) is not None, 30, message="the workers to recreate the group")
        publish(client, ns.stream, valid_payloads(500, "second"))
        wait_for(lambda: fully_drained(client, ns), 60, message="the entries after the restart")
        assert libraries(client) == [LIBRARY_NAME.encode()]
        status = ns.fraudd("status")
        assert status.returncode == 0, status.stdout
    finally:
        log = stop(daemon)
    assert rows(ns) == (1000, 1000)
    assert '"group_recreated"' in log and '"outage"' in log
    assert '"halted"' not in log


def test_redis_down_for_a_while_nothing_lost(
    dedicated_redis: RedisServer, dedicated_postgres: PostgresServer, tmp_path: Path
) -> None:
    ns = dedicated_namespace(dedicated_redis, dedicated_postgres.url)
    client = dedicated_redis.client()
    publish(client, ns.stream, valid_payloads(4000, "steady"))
    daemon = start(ns, tmp_path, "--workers", "2", "--batch-size", "100")
    try:
        wait_for(lambda: rows(ns)[0] > 500, 60, message="scoring to start")
        dedicated_redis.kill()
        time.sleep(1.0)
        status = ns.fraudd("status")
        assert status.returncode == 1 and "redis      DOWN" in status.stdout, status.stdout
        time.sleep(2.0)
        assert daemon.process.poll() is None
        dedicated_redis.start()
        wait_for(lambda: fully_drained(client, ns), 90, message="the stream after Redis came back")
    finally:
        log = stop(daemon)
    assert rows(ns) == (4000, 4000)
    assert '"outage"' in log and '"halted"' not in log
    assert dlq(client, ns) == []


# -- the supervisor dies -----------------------------------------------------------------------


def test_workers_exit_when_their_supervisor_is_killed(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    publish(redis_client, ns.stream, valid_payloads(3000, "orphan"))
    daemon = start(ns, tmp_path, "--workers", "2", "--batch-size", "100")
    try:
        wait_for(lambda: daemon.log().count('"worker_started"') == 2, 30, message="two workers")
        workers = worker_pids(daemon.pid)
        assert len(workers) == 2
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait(timeout=10)
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, message="the orphaned workers to exit")
    finally:
        daemon.kill_group()
    # What they read and did not settle is still pending, for the next supervisor's workers.
    (tmp_path / "again").mkdir()
    again = start(ns, tmp_path / "again", "--workers", "2", "--batch-size", "100")
    try:
        # On a quick box the first workers may have settled everything: wait for the start-up to
        # end, so that the stop below is the graceful one, not a signal during start-up.
        wait_for(lambda: '"ready"' in again.log(), 30, message="the next supervisor ready")
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the rest")
    finally:
        stop(again)
    assert rows(ns) == (3000, 3000)
