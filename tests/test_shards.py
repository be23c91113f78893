"""Sharded input (``--shards``): the same decisions as one shard, and shard ownership by lease.

The shared Redis and PostgreSQL, each test in its own namespaces.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.runtime.process import WorkerProcess
from fraudd.runtime.redis_clients import connect_redis
from fraudd.scoring.features import stored_states
from fraudd.scoring.settings import ScoringSettings
from fraudd.scoring.shards import ShardReader
from fraudd.settings import ConsumerSettings, MetricsSettings, PostgresSettings, RedisSettings

from .conftest import Namespace, kill_workers_until, migrate, wait_for, worker_pids
from .services import DaemonProcess, start, stop
from .streams import alerts, dlq, fully_drained

SHARDS = 8


def decisions(ns: Namespace) -> dict[str, tuple]:
    return {
        txid: (round(score, 5), decision)
        for txid, score, decision in ns.sql("SELECT transaction_id, score, decision FROM transactions")
    }


def lease_owners(client: redis.Redis, ns: Namespace, shards: int) -> list[str | None]:
    values = client.mget([Keys(shard_stream(ns.stream, shards, k), ns.fraud_stream, ns.dlq_stream).lease for k in range(shards)])
    return [v.decode() if v else None for v in values]


@pytest.fixture
def second_ns(redis_client: redis.Redis):
    namespace = Namespace(f"t{uuid.uuid4().hex[:10]}")
    migrate(namespace)
    yield namespace
    namespace.drop(redis_client)


def test_publisher_routes_by_the_crc32_of_the_user(redis_client: redis.Redis, ns: Namespace) -> None:
    payloads = [b'{"user_id":"alice","transaction_id":"a"}', b'{"user_id":"bob","transaction_id":"b"}', b"not json"]
    Publisher(redis_client, ns.stream, SHARDS).publish(payloads)
    where = {k: redis_client.xlen(shard_stream(ns.stream, SHARDS, k)) for k in range(SHARDS)}
    expected = Counter([shard_of("alice", SHARDS), shard_of("bob", SHARDS), 0])
    assert where == {k: expected.get(k, 0) for k in range(SHARDS)}
    assert shard_stream(ns.stream, SHARDS, 3) == f"{ns.stream}:{{3}}"
    assert Keys(shard_stream(ns.stream, SHARDS, 3), ns.fraud_stream, ns.dlq_stream).prefix.endswith(":{3}:")


def started_reader(ns: Namespace, shards: int, worker: int = 0, block_ms: int = 50, lease_ms: int = 10_000) -> ShardReader:
    """Worker ``worker``'s reader, joined to the owners of ``shards`` (release_all it afterwards)."""
    consumer = ConsumerSettings(ns.stream, ns.group, f"{ns.name}-c", workers=1, batch_size=100, block_ms=block_ms)
    settings = ScoringSettings(
        RedisSettings(ns.redis_url),
        PostgresSettings(ns.postgres_url, ns.schema),
        consumer,
        MetricsSettings(),
        ns.fraud_stream,
        ns.dlq_stream,
        "INFO",
        shards=shards,
        lease_ms=lease_ms,
    )
    reader = ShardReader(
        connect_redis(ns.redis_url), settings, consumer.consumer_name(worker), WorkerProcess(worker), lambda kind: None
    )
    reader.start()
    return reader


def owned_shards_reader(ns: Namespace, shards: int, block_ms: int = 50) -> ShardReader:
    """A worker's reader owning every one of ``shards``, past each shard's take-over and first claim pass."""
    reader = started_reader(ns, shards, block_ms=block_ms)
    assert sorted(reader.shards) == list(range(shards))
    while reader.read():  # each shard's take-over and first claim pass, one shard at a time
        pass
    return reader


def payloads_of(users: list[str]) -> list[bytes]:
    return [
        b'{"transaction_id": "t%d", "user_id": "%s", "amount": 1, "merchant": "m", "timestamp": 1}' % (i, u.encode())
        for i, u in enumerate(users)
    ]


def test_a_worker_reads_the_new_entries_of_all_its_shards_in_one_read(redis_client: redis.Redis, ns: Namespace) -> None:
    shards = 4
    reader = owned_shards_reader(ns, shards)
    try:
        # A claim pass falling due on one shard (as every few seconds) reads nothing to claim, and
        # the read goes on over every shard's new entries.
        reader.shards[1].consumer._next_claim = 0.0
        users = [f"user-{i}" for i in range(200)]
        Publisher(redis_client, ns.stream, shards).publish(payloads_of(users))
        reads, entries = read_metrics()
        read = reader.read()
        per_shard = Counter(shard_of(u, shards) for u in users)
        # One XREADGROUP: up to ceil(100 / 4) new entries of every shard, each part held by its shard's consumer.
        assert {shard.index: len(part) for shard, part in reader.parts} == {k: min(25, per_shard[k]) for k in range(shards)}
        assert len(read) == sum(len(part) for _shard, part in reader.parts)
        assert all(shard.consumer.held == len(part) for shard, part in reader.parts)
        # The read is one batch to the metrics, like every later stage of it: timed and sized once.
        assert read_metrics() == (reads + 1, entries + len(read))
    finally:
        reader.release_all()


def read_metrics() -> tuple[float, float]:
    """(reads, entries read) as this process's metrics count them."""
    sample = REGISTRY.get_sample_value
    reads = sample("fraudd_stage_duration_seconds_count", {"stage": "read"}) or 0.0
    return reads, sample("fraudd_batch_size_sum") or 0.0


def test_a_read_that_blocked_takes_what_every_shard_received_meanwhile(redis_client: redis.Redis, ns: Namespace) -> None:
    """Redis before 7.2 answers a blocked read over several streams with the one written first;
    the entries the other shards received in the same round trip belong to the same read."""
    shards = 4
    reader = owned_shards_reader(ns, shards, block_ms=5000)
    users = [f"user-{i}" for i in range(40)]
    sending = threading.Timer(0.3, lambda: Publisher(redis_client, ns.stream, shards).publish(payloads_of(users)))
    try:
        sending.start()
        read = reader.read()  # blocks until the entries arrive
        per_shard = Counter(shard_of(u, shards) for u in users)
        assert {shard.index: len(part) for shard, part in reader.parts} == dict(per_shard)
        assert len(read) == len(users)
    finally:
        sending.join()
        reader.release_all()


def test_one_and_eight_shards_give_the_same_decisions(
    redis_client: redis.Redis, ns: Namespace, second_ns: Namespace, tmp_path: Path
) -> None:
    generated = TransactionGenerator(GeneratorConfig(seed=21, tx_per_second=50.0)).generate(10_000)
    faulty = generated.with_faults(duplicate_rate=0.01, invalid_rate=0.002, rng=np.random.default_rng(1))
    payloads = [p for p in faulty.payloads if p is not None]  # (an entry without a data field is not a payload)
    Publisher(redis_client, ns.stream).publish(payloads)
    Publisher(redis_client, second_ns.stream, SHARDS).publish(payloads)
    # One worker on one shard is the reference order; eight owned shards over two workers must agree.
    (tmp_path / "one").mkdir()
    (tmp_path / "eight").mkdir()
    one = start(ns, tmp_path / "one", "--workers", "1")
    eight = start(second_ns, tmp_path / "eight", "--workers", "2", "--shards", str(SHARDS), "--lease-ms", "3000")
    try:
        wait_for(lambda: fully_drained(redis_client, ns), 180, message="one shard drained")
        wait_for(lambda: fully_drained(redis_client, second_ns, SHARDS), 180, message="eight shards drained")
    finally:
        stop(one)
        log = stop(eight)
    assert log.count('"shard_taken"') >= SHARDS
    reference, sharded = decisions(ns), decisions(second_ns)
    assert len(reference) == len(set(generated.transaction_ids))
    assert sharded == reference
    assert sorted(a["transaction_id"] for a in alerts(redis_client, second_ns)) == sorted(
        a["transaction_id"] for a in alerts(redis_client, ns)
    )
    assert len(dlq(redis_client, second_ns)) == len(dlq(redis_client, ns)) > 0


def test_a_blocked_card_is_declined_on_every_shard(redis_client: redis.Redis, ns: Namespace, tmp_path: Path) -> None:
    """`fraudd rules block card` reaches every shard's blocklist: the card's next transaction is
    declined by the default `blocklist = "card"` rule whichever worker owns the user's shard."""
    shards = 4
    blocked = ns.fraudd("rules", "block", "card", "card-stolen", "--reason", "reported stolen", "--shards", str(shards))
    assert blocked.returncode == 0, blocked.stderr
    users = {shard_of(f"user-{i}", shards): f"user-{i}" for i in range(100)}
    assert len(users) == shards
    now = int(time.time())
    payloads = [
        orjson.dumps(
            {
                "transaction_id": f"{user}-{card}",
                "user_id": user,
                "amount": 20.0,
                "merchant": "m",
                "timestamp": now,
                "card_id": card,
            }
        )
        for user in users.values()
        for card in ("card-stolen", "card-fine")
    ]
    Publisher(redis_client, ns.stream, shards).publish(payloads)
    daemon = start(ns, tmp_path, "--workers", "2", "--shards", str(shards), "--lease-ms", "3000")
    try:
        wait_for(lambda: fully_drained(redis_client, ns, shards), 60, message="every shard drained")
    finally:
        stop(daemon)
    rows = {
        txid: (decision, reasons)
        for txid, decision, reasons in ns.sql("SELECT transaction_id, decision, reasons FROM transactions")
    }
    assert len(rows) == len(payloads)
    for user in users.values():
        assert rows[f"{user}-card-stolen"][0] == "decline" and "R_BLOCKED_CARD" in rows[f"{user}-card-stolen"][1]
        assert "R_BLOCKED_CARD" not in rows[f"{user}-card-fine"][1]


# --pipeline-depth 2: a read settles in a thread while the next is scored; it must stay fenced by
# its own shard's lease, paused, killed or handed over.
@pytest.mark.parametrize("depth", [1, 2])
def test_a_paused_owner_is_taken_over_and_writes_nothing_when_resumed(
    redis_client: redis.Redis, ns: Namespace, tmp_path: Path, depth: int
) -> None:
    shards, lease_ms = 4, 2000
    generated = TransactionGenerator(GeneratorConfig(seed=22, tx_per_second=50.0)).generate(24_000)
    payloads = generated.payloads()
    publisher = Publisher(redis_client, ns.stream, shards)
    publisher.publish(payloads[:16_000])
    daemon = start(
        ns,
        tmp_path,
        "--workers",
        "2",
        "--shards",
        str(shards),
        "--lease-ms",
        str(lease_ms),
        "--batch-size",
        "200",
        "--pipeline-depth",
        str(depth),
    )
    try:
        wait_for(lambda: len(worker_pids(daemon.pid)) == 2, 30, message="two workers")
        workers = worker_pids(daemon.pid)
        wait_for(
            lambda: all(any(f"/{pid}/" in (o or "") for o in lease_owners(redis_client, ns, shards)) for pid in workers),
            30,
            message="both workers to own shards",
        )
        paused = workers[0]
        owners = [o for o in lease_owners(redis_client, ns, shards) if f"/{paused}/" in (o or "")]
        paused_name = owners[0].split(":", 1)[1].split("/")[0]
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 2000, 60, message="scoring under way")
        os.kill(paused, signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            # Traffic for every shard after the pause: the paused worker's shards cannot drain
            # unless the other worker takes them over, once their leases expire.
            publisher.publish(payloads[16_000:20_000])
            wait_for(lambda: fully_drained(redis_client, ns, shards), 120, message="the paused worker's shards drained")
            taken_after = time.monotonic() - paused_at
            assert all(f"/{paused}/" not in (o or "") for o in lease_owners(redis_client, ns, shards))
        finally:
            os.kill(paused, signal.SIGCONT)
        publisher.publish(payloads[20_000:])
        wait_for(lambda: fully_drained(redis_client, ns, shards), 60, message="the rest drained")
    finally:
        log = stop(daemon)
    assert taken_after >= lease_ms / 1000 * 0.5
    # Resumed, the paused worker finds its leases gone and drops its shards instead of writing.
    resumed = [line for line in log.splitlines() if '"shard_lost"' in line and f'"worker": "{paused_name}"' in line]
    assert resumed, log[-3000:]
    assert '"batch_bisected"' not in log
    # Exactly once despite the pause: one row per transaction, one alert per flagged one, nothing pending.
    rows = ns.sql(
        "SELECT count(*), count(DISTINCT transaction_id), count(*) FILTER (WHERE decision <> 'approve') FROM transactions"
    )[0]
    assert rows[:2] == (24_000, 24_000)
    flagged = [a["transaction_id"] for a in alerts(redis_client, ns)]
    assert len(flagged) == len(set(flagged)) == rows[2]
    assert dlq(redis_client, ns) == []


def test_status_shows_the_shards_and_their_owners(redis_client: redis.Redis, ns: Namespace, tmp_path: Path) -> None:
    daemon = start(ns, tmp_path, "--workers", "2", "--shards", "4", "--lease-ms", "2000")
    try:
        # Settled: both workers hold their even share (the first one up takes all, then gives two back).
        wait_for(
            lambda: all(lease_owners(redis_client, ns, 4)) and len(set(lease_owners(redis_client, ns, 4))) == 2,
            30,
            message="every shard owned, two each",
        )
        status = ns.fraudd("status", "--shards", "4", timeout=30).stdout
    finally:
        stop(daemon)
    assert "(4 shards)" in status and "shards     4: 4 owned" in status, status


def test_shards_given_back_at_a_heartbeat_are_taken_at_once(redis_client: redis.Redis, ns: Namespace) -> None:
    """The first worker up takes every shard and gives half back at its next heartbeat; the second,
    which found every shard taken a moment before, takes them within tens of milliseconds, not at
    its own next heartbeat a third of a lease later (a shard given back is read by nobody)."""
    first = started_reader(ns, SHARDS, worker=0)
    second = None
    try:
        assert len(first.shards) == SHARDS
        second = started_reader(ns, SHARDS, worker=1)
        assert not second.shards
        first._next_tick = 0.0  # its heartbeat falls now
        first.read()
        assert len(first.shards) == SHARDS // 2
        joined = second
        wait_for(lambda: (joined.read(), all(lease_owners(redis_client, ns, SHARDS)))[1], 1.0, message="every shard owned")
        assert len(second.shards) == SHARDS // 2
    finally:
        for reader in (first, second):
            if reader is not None:
                reader.release_all()


def test_a_graceful_stop_hands_its_shards_over_before_its_heartbeat_ages_out(
    redis_client: redis.Redis, ns: Namespace, tmp_path: Path
) -> None:
    """A stopping worker leaves the registry with its leases: the other takes its shards over at its
    next heartbeat (250 ms), not a third of a lease later nor once the stopped one's heartbeat is a
    lease old."""
    shards, lease_ms = 4, 12_000
    args = ("--workers", "1", "--shards", str(shards), "--lease-ms", str(lease_ms))
    stopping = DaemonProcess.start(ns, tmp_path / "a.log", *args, CONSUMER_ID=f"{ns.name}-a")
    staying = DaemonProcess.start(ns, tmp_path / "b.log", *args, CONSUMER_ID=f"{ns.name}-b")

    def held_by(consumer_id: str) -> int:
        return sum(f":{ns.name}-{consumer_id}-" in (o or "") for o in lease_owners(redis_client, ns, shards))

    try:
        wait_for(lambda: held_by("a") == held_by("b") == 2, 60, message="two shards each")
        os.kill(stopping.pid, signal.SIGTERM)
        wait_for(lambda: held_by("a") == 0, 30, interval=0.02, message="the stopping worker's leases given back")
        wait_for(lambda: held_by("b") == shards, 2.0, interval=0.02, message="every shard taken over")
    finally:
        stop(staying)
        stop(stopping)


def test_three_workers_settle_on_three_three_and_two_of_eight_shards(
    redis_client: redis.Redis, ns: Namespace, tmp_path: Path
) -> None:
    """Shares sum to the shard count: once settled nobody is short, and nothing changes hands."""
    lease_ms = 3000
    daemon = start(ns, tmp_path, "--workers", "3", "--shards", str(SHARDS), "--lease-ms", str(lease_ms))

    def shares() -> list[int]:
        owners = lease_owners(redis_client, ns, SHARDS)
        return sorted(Counter(o.split(":", 1)[1] for o in owners if o).values()) if all(owners) else []

    try:
        wait_for(lambda: shares() == [2, 3, 3], 60, message="shares of 3, 3 and 2")
        settled = lease_owners(redis_client, ns, SHARDS)
        for _ in range(3 * 10):  # a lease: a dozen heartbeats of each worker
            time.sleep(lease_ms / 1000 / 3 / 10)
            assert lease_owners(redis_client, ns, SHARDS) == settled
    finally:
        log = stop(daemon)
    assert log.count('"shard_taken"') - log.count('"shard_released"') == SHARDS


@pytest.mark.parametrize("depth", [1, 2])
def test_worker_kills_across_handovers_keep_every_guarantee(
    redis_client: redis.Redis, ns: Namespace, tmp_path: Path, depth: int
) -> None:
    """DESIGN.md's six guarantees by exact counts, per shard, while owners are SIGKILLed and shards
    change hands (the respawned worker is a new owner: it waits out the dead one's lease).

    On a busy box a read can be in flight at several kills in a row (twice as likely with two
    reads in flight), and every kill is a delivery: the poison bar sits above what the kills
    alone reach (poison itself is tested in test_recovery)."""
    shards = 4
    generated = TransactionGenerator(GeneratorConfig(seed=23, tx_per_second=50.0)).generate(30_000)
    faults = generated.with_faults(0.01, 0.005, np.random.default_rng(3))
    payloads = [p for p in faults.payloads if p is not None]
    txids, users = generated.transaction_id.tolist(), generated.user_id.tolist()
    expected_rows = {txids[row]: users[row] for row, reason in zip(faults.row.tolist(), faults.reason) if reason is None}
    ids = Publisher(redis_client, ns.stream, shards).publish(payloads)
    invalid = {
        entry_id
        for entry_id, p, reason in zip(ids, payloads, [r for p, r in zip(faults.payloads, faults.reason) if p is not None])
        if reason is not None
    }
    daemon = start(
        ns,
        tmp_path,
        "--workers",
        "2",
        "--shards",
        str(shards),
        "--lease-ms",
        "1500",
        "--batch-size",
        "300",
        "--pipeline-depth",
        str(depth),
        "--max-deliveries",
        "12",
    )
    rng = np.random.default_rng(5)
    try:
        # Kills close together: a quiet box drains in a few seconds, and the test needs several. A
        # loaded box may spend the first round starting its workers: more rounds until three landed.
        kills, deadline = 0, time.monotonic() + 120
        while (
            daemon.log().count('"worker_died"') < 3
            and not fully_drained(redis_client, ns, shards)
            and time.monotonic() < deadline
        ):
            kills += kill_workers_until(lambda: fully_drained(redis_client, ns, shards), daemon.pid, 12, rng, every_s=(0.2, 0.6))
        wait_for(lambda: fully_drained(redis_client, ns, shards), 120, interval=0.5, message="the drain after the kills")
    finally:
        log = stop(daemon)
    assert kills >= 3 and log.count('"worker_died"') >= 3

    # 1. one row per distinct valid transaction_id
    stored = ns.sql("SELECT transaction_id, decision FROM transactions")
    assert len(stored) == len(expected_rows) and {t for t, _ in stored} == expected_rows.keys()
    decision = dict(stored)
    # 2. and 6. one alert per non-approved id, carrying PostgreSQL's decision
    sent = alerts(redis_client, ns)
    assert sorted(a["transaction_id"] for a in sent) == sorted(t for t, d in decision.items() if d != "approve")
    assert all(a["decision"] == decision[a["transaction_id"]] for a in sent)
    # 3. each invalid entry dead-lettered once
    letters = [d["source_id"].decode() for d in dlq(redis_client, ns)]
    assert sorted(letters) == sorted(invalid)
    # 4. nothing pending (fully drained) and 5. behaviour counted each transaction once, per shard
    markers = sum(redis_client.hlen(bucket) for bucket in redis_client.scan_iter(match=f"fraudd:{ns.stream}:*:seen:*"))
    assert markers == len(expected_rows)
    per_user = Counter(expected_rows.values())
    for user, count in per_user.items():
        keys = Keys(shard_stream(ns.stream, shards, shard_of(user, shards)), ns.fraud_stream, ns.dlq_stream)
        raw = stored_states(redis_client, keys, [user])[0]
        assert struct.unpack_from("<dI", raw)[1] == count, user
