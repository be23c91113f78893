"""Redis Cluster (``--redis-cluster``): DESIGN.md's six guarantees by exact counts on a real cluster
of 3 masters and 3 replicas, started by the test, while things go wrong.

Two supervisors (different CONSUMER_ID) share 8 shards; their workers are SIGKILLed now and then;
one supervisor is killed for good with its workers (the other takes its shards over once their
leases expire); the master serving the fraud stream's slot (and some shards') is SIGKILLed and its
replica promoted while scoring goes on, and every primary loses the Function library: 50,000
transactions in about 10 s on 2 busy cores (30,000 before the failover: scoring is under way
through it). Batches of 1,000 and a kill storm
of 5 s keep it there (each SIGKILL idles the dead worker's shards for a lease); throughput is
bench/'s business.

A second run moves two shards' slots to other masters while they are scored, as a reshard does:
the workers meet ASK, TRYAGAIN and MOVED, wait each out, and every guarantee still holds. A third
freezes a master's replica: that master's lease grants are handed back until it acknowledges them.
A fourth loses an owner's last features commit with its master and redelivers it; a fifth checks
that a replica wait counts a write made on another connection. Two more drive one shard's reader
alone: through its slot moving away while its read blocks there, and through a failover that lost
its consumer group's creation.
Each test has a fresh cluster (2-3 s to start): the first leaves one master without a replica.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from redis.cluster import RedisCluster

from bench.redis_cluster import RedisClusterServers
from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.runtime.consumer import Stopping, StreamConsumer, ensure_group
from fraudd.runtime.process import WorkerProcess
from fraudd.runtime.redis_clients import CLUSTER_CHANGED, ReplicaWait, async_redis_client, connect_redis
from fraudd.scoring.decode import DecodedBatch, decode_batch
from fraudd.scoring.features import LIBRARY_NAME, stored_states
from fraudd.scoring.features_owned import OwnedFeatureStore
from fraudd.scoring.leases import Lease
from fraudd.settings import ConsumerSettings

from .conftest import Namespace, kill_workers_until, wait_for, worker_pids
from .services import DaemonProcess, stop
from .streams import NOW, alerts, dlq, fully_drained, payload

SHARDS = 8
TRANSACTIONS = 50_000
PUBLISHED_FIRST = 0.6  # the rest goes out after the failover, through the promoted replica
LEASE_MS = 1500
MIGRATION_TRANSACTIONS = 40_000
MIGRATED_SHARDS = (0, 1)
# Every SIGKILL is a delivery of the reads in flight: the poison bar sits above what the kills reach.
DAEMON_ARGS = (
    "--workers",
    "2",
    "--shards",
    str(SHARDS),
    "--lease-ms",
    str(LEASE_MS),
    "--batch-size",
    "1000",
    "--max-deliveries",
    "12",
)


@dataclass
class Traffic:
    """Generated transactions with faults (duplicates, invalid entries), as published, and what
    DESIGN.md's guarantees make of them."""

    payloads: list[bytes]
    reasons: list[str | None]  # per payload: why it is invalid, None when valid
    expected_rows: dict[str, str]  # transaction_id -> user_id of each distinct valid transaction

    @classmethod
    def generate(cls, count: int, seed: int) -> Traffic:
        generated = TransactionGenerator(GeneratorConfig(seed=seed, tx_per_second=50.0)).generate(count)
        faults = generated.with_faults(0.01, 0.005, np.random.default_rng(seed))
        kept = [(p, reason) for p, reason in zip(faults.payloads, faults.reason) if p is not None]
        txids, users = generated.transaction_id.tolist(), generated.user_id.tolist()
        return cls(
            [p for p, _reason in kept],
            [reason for _p, reason in kept],
            {txids[row]: users[row] for row, reason in zip(faults.row.tolist(), faults.reason) if reason is None},
        )

    def assert_guarantees(self, client: RedisCluster, ns: Namespace, ids: list[str]) -> None:
        """DESIGN.md's six guarantees by exact counts, once the stream is fully drained; ``ids``:
        the entry id of each payload as published."""
        # 1. one row per distinct valid transaction_id
        stored = ns.sql("SELECT transaction_id, decision FROM transactions")
        assert len(stored) == len(self.expected_rows) and {t for t, _ in stored} == self.expected_rows.keys()
        decision = dict(stored)
        # 2. and 6. one alert per non-approved id, carrying PostgreSQL's decision
        sent = alerts(client, ns)
        assert sorted(a["transaction_id"] for a in sent) == sorted(t for t, d in decision.items() if d != "approve")
        assert all(a["decision"] == decision[a["transaction_id"]] for a in sent)
        # 3. each invalid entry dead-lettered once (entry ids are per shard stream: count them as pairs)
        letters = Counter(d["source_id"].decode() for d in dlq(client, ns))
        assert letters == Counter(entry_id for entry_id, reason in zip(ids, self.reasons) if reason is not None)
        # 4. nothing pending (fully drained) and 5. behaviour counted each transaction once, per shard
        markers = sum(client.hlen(bucket) for bucket in client.scan_iter(match=f"fraudd:{ns.stream}:*:seen:*", count=10_000))
        assert markers == len(self.expected_rows)
        counts = Counter(self.expected_rows.values())
        counted: dict[str, int] = {}
        for k in range(SHARDS):
            users = [user for user in counts if shard_of(user, SHARDS) == k]
            keys = Keys(shard_stream(ns.stream, SHARDS, k), ns.fraud_stream, ns.dlq_stream)
            counted.update(
                {user: struct.unpack_from("<dI", raw)[1] for user, raw in zip(users, stored_states(client, keys, users))}
            )
        assert counted == counts


def test_every_guarantee_through_kills_a_lost_supervisor_and_a_failover(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, cluster_ns: Namespace, tmp_path: Path
) -> None:
    ns = cluster_ns
    traffic = Traffic.generate(TRANSACTIONS, seed=31)
    publisher = Publisher(cluster_client, ns.stream, SHARDS)
    first = int(len(traffic.payloads) * PUBLISHED_FIRST)
    ids = publisher.publish(traffic.payloads[:first])

    a = DaemonProcess.start(ns, tmp_path / "a.log", *DAEMON_ARGS, CONSUMER_ID=f"{ns.name}-a")
    b = DaemonProcess.start(ns, tmp_path / "b.log", *DAEMON_ARGS, CONSUMER_ID=f"{ns.name}-b")
    rng = np.random.default_rng(9)
    kills = 0
    try:
        wait_for(lambda: len(worker_pids(a.pid)) == 2 and len(worker_pids(b.pid)) == 2, 60, message="four workers")
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 1000, 60, message="scoring under way")
        os.kill(int(rng.choice(worker_pids(a.pid))), signal.SIGKILL)
        kills += 1
        b.kill_group()  # for good: its workers die with it, their shards wait out their leases
        redis_cluster.fail_over(redis_cluster.master_of(ns.fraud_stream))
        ids += publisher.publish(traffic.payloads[first:])
        # As a node restarted without persistence would: the workers load the library again.
        cluster_client.function_flush("SYNC")
        kills += kill_workers_until(lambda: fully_drained(cluster_client, ns, SHARDS), a.pid, 5, rng)
        wait_for(lambda: fully_drained(cluster_client, ns, SHARDS), 120, interval=0.5, message="the drain")
    finally:
        b.kill_group()
        log = stop(a)
    assert kills >= 2 and log.count('"worker_died"') >= 2
    assert '"shard_taken"' in log and '"outage"' in log, log[-3000:]
    traffic.assert_guarantees(cluster_client, ns, ids)

    # The library is back on every primary that serves a shard.
    masters = {redis_cluster.master_of(shard_stream(ns.stream, SHARDS, k)).port: k for k in range(SHARDS)}
    for node in redis_cluster.live():
        if node.port in masters:
            with node.client() as client:
                libraries = [dict(zip(lib[::2], lib[1::2]))[b"library_name"] for lib in client.function_list()]
                assert libraries == [LIBRARY_NAME.encode()], node.port

    # Status and start-up checks go through the cluster client too; one shard would be one node.
    status = ns.fraudd("status", "--shards", str(SHARDS), timeout=30)
    assert status.returncode == 0 and f"({SHARDS} shards)" in status.stdout, status.stdout + status.stderr
    refused = ns.fraudd("status")
    assert refused.returncode != 0 and "--redis-cluster needs --shards > 1" in refused.stderr, refused.stderr
    # One evicting primary is enough to refuse the cluster at start-up.
    with redis_cluster.master_of(shard_stream(ns.stream, SHARDS, 0)).client() as node:
        node.config_set("maxmemory-policy", "allkeys-lru")
        try:
            refused = ns.fraudd("run", "--shards", str(SHARDS), timeout=60)
        finally:
            node.config_set("maxmemory-policy", "noeviction")
    assert refused.returncode != 0 and "maxmemory-policy is allkeys-lru" in refused.stderr, refused.stderr


def redirections(log: str) -> int:
    """How many outages began with a cluster redirection (ASK, TRYAGAIN or MOVED) in a daemon's log."""
    outages = (orjson.loads(line) for line in log.splitlines() if '"outage"' in line)
    return sum(outage.get("error_type") in ("AskError", "TryAgainError", "MovedError") for outage in outages)


def test_shards_whose_slots_move_to_another_master_while_scoring(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, cluster_ns: Namespace, tmp_path: Path
) -> None:
    """Two shards' slots move to other masters key batch by key batch while ``fraudd run`` scores
    them and the producer goes on writing: the workers meet ASK, TRYAGAIN and MOVED, wait each out
    as an outage, and carry on; every guarantee holds by exact counts."""
    ns = cluster_ns
    traffic = Traffic.generate(MIGRATION_TRANSACTIONS, seed=41)
    publisher = Publisher(cluster_client, ns.stream, SHARDS)
    first = len(traffic.payloads) // 2
    ids = publisher.publish(traffic.payloads[:first])
    # The rest goes out chunk by chunk between the migration's steps, into half-moved slots.
    chunks = iter(range(first, len(traffic.payloads), 500))

    def step(shard: int, before: int) -> None:
        if (start := next(chunks, None)) is not None:
            ids.extend(publisher.publish(traffic.payloads[start : start + 500]))
        # The slot stays half moved until a worker has met it (as a slow reshard would).
        wait_for(lambda: redirections(daemon.log()) > before, 30, message=f"a worker redirected off shard {shard}")

    daemon = DaemonProcess.start(ns, tmp_path / "fraudd.log", *DAEMON_ARGS)
    try:
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 1000, 60, message="scoring under way")
        for k in MIGRATED_SHARDS:
            slot = redis_cluster.slot_of(shard_stream(ns.stream, SHARDS, k))
            source = redis_cluster.master_of_slot(slot)
            target = next(master for master in redis_cluster.masters_now() if master is not source)
            redis_cluster.migrate_slot(slot, target, between_steps=functools.partial(step, k, redirections(daemon.log())))
            assert redis_cluster.master_of_slot(slot) is target
        for start in chunks:
            ids += publisher.publish(traffic.payloads[start : start + 500])
        wait_for(lambda: fully_drained(cluster_client, ns, SHARDS), 120, interval=0.5, message="the drain")
    finally:
        log = stop(daemon)
    assert '"shard_taken"' in log, log[-3000:]
    traffic.assert_guarantees(cluster_client, ns, ids)


def test_a_lease_grant_counts_once_a_replica_holds_it(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, cluster_ns: Namespace, tmp_path: Path
) -> None:
    """While the replica of shard 0's master is frozen, that master's grants are handed back (a
    failover would roll their epoch back); the other masters' shards are scored meanwhile, and once
    the replica is back every shard is, each guarantee by exact counts."""
    ns = cluster_ns
    traffic = Traffic.generate(5000, seed=51)
    ids = Publisher(cluster_client, ns.stream, SHARDS).publish(traffic.payloads)
    master = redis_cluster.master_of(shard_stream(ns.stream, SHARDS, 0))
    frozen = {k for k in range(SHARDS) if redis_cluster.master_of(shard_stream(ns.stream, SHARDS, k)) is master}
    replica = redis_cluster.replicas_of(master)[0]
    os.kill(replica.process.pid, signal.SIGSTOP)
    daemon = DaemonProcess.start(ns, tmp_path / "fraudd.log", *DAEMON_ARGS)
    try:
        try:
            wait_for(lambda: '"lease_unreplicated"' in daemon.log(), 30, message="a grant handed back")
            wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 1000, 30, message="others scored")
            taken = {orjson.loads(line)["shard"] for line in daemon.log().splitlines() if '"shard_taken"' in line}
            scored = {shard_of(user, SHARDS) for (user,) in ns.sql("SELECT DISTINCT user_id FROM transactions")}
            assert taken and not (taken | scored) & frozen, (taken, scored, frozen)
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        wait_for(lambda: fully_drained(cluster_client, ns, SHARDS), 60, interval=0.5, message="the drain")
    finally:
        log = stop(daemon)
    taken = {orjson.loads(line)["shard"] for line in log.splitlines() if '"shard_taken"' in line}
    assert taken == set(range(SHARDS)), log[-3000:]
    traffic.assert_guarantees(cluster_client, ns, ids)


def test_an_owner_whose_last_commit_died_with_its_master_counts_its_redelivery_once(
    redis_cluster: RedisClusterServers, cluster_ns: Namespace
) -> None:
    """Replication is asynchronous: a features commit its master acknowledged and took to the grave
    is gone from the promoted replica, and its entries come back pending to the same owner (its
    lease, replicated long before, survived). The owner starts again from what the replica holds
    instead of counting them a second time on top of the states it kept in memory."""
    ns = cluster_ns
    keys = Keys(shard_stream(ns.stream, SHARDS, 0), ns.fraud_stream, ns.dlq_stream)
    master = redis_cluster.master_of(keys.stream)
    replica = redis_cluster.replicas_of(master)[0]
    client = connect_redis(redis_cluster.url, cluster=True)
    lease = Lease(keys.lease, "1:owner")
    client.set(keys.lease, lease.token, px=120_000)
    store = OwnedFeatureStore(client, keys, 3_600_000, lease)

    def batch(*txids: str) -> DecodedBatch:
        return decode_batch(
            [f"{i + 1}-0" for i in range(len(txids))], [payload(txid, user="u", ts=NOW - 60 + i) for i, txid in enumerate(txids)]
        )

    store.compute(batch("a1", "a2"))
    with master.client() as node:
        node.incr(keys.prefix + "probe")  # WAIT counts this connection's writes: everything before is on the replica
        assert node.execute_command("WAIT", 1, 5000) == 1
        os.kill(replica.process.pid, signal.SIGSTOP)
        node.execute_command("CLIENT", "KILL", "TYPE", "replica")
    store.compute(batch("b1", "b2"))  # on the master alone
    master.kill()
    os.kill(replica.process.pid, signal.SIGCONT)
    slot = redis_cluster.slot_of(keys.stream)
    wait_for(lambda: redis_cluster.master_of_slot(slot) is replica, 60, message="the replica promoted")

    def redelivered() -> bool:
        try:
            return not store.compute(batch("b1", "b2")).seen.any()
        except CLUSTER_CHANGED:  # the old master's address until the slot map is learnt again
            return False

    wait_for(redelivered, 30, interval=0.2, message="the redelivery scored on the promoted replica")
    raw = stored_states(client, keys, ["u"])[0]
    assert struct.unpack_from("<dI", raw)[1] == 4
    client.close()


def test_a_replica_wait_counts_the_write_made_on_another_connection(redis_cluster: RedisClusterServers) -> None:
    """WAIT answers for what its own connection did last, and a pooled client may send it on a
    connection idle since before the write, which answers at once with every replica that has
    acknowledged that much. With the replica frozen, a wait after a write made elsewhere must find
    that no replica has it, with the plain and with the asyncio client."""
    asyncio.run(frozen_replica_waits(redis_cluster, "fraudd:{replica-wait}:written"))


async def frozen_replica_waits(redis_cluster: RedisClusterServers, key: str) -> None:
    master = redis_cluster.master_of(key)
    replica = redis_cluster.replicas_of(master)[0]
    writer, idle = master.client(), master.client()
    aclient = async_redis_client(redis_cluster.url, cluster=True)
    try:
        # Both waiting clients' connections do their last command before every write below.
        idle.ping()
        await aclient.initialize()
        await aclient.execute_command("PING", target_nodes=aclient.get_node_from_key(key))
        writer.set(key, "before")
        assert writer.execute_command("WAIT", 1, 5000) == 1  # the replica has acknowledged as much
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            writer.set(key, "after")
            unreplicated, unreplicated_async = ReplicaWait(), ReplicaWait()
            unreplicated.wait(idle, key)
            await unreplicated_async.wait_async(aclient, key)
            # Timed out: the master is left unwaited for a while.
            assert not unreplicated.due(key) and not unreplicated_async.due(key)
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
    finally:
        writer.close()
        idle.close()
        await aclient.aclose()


def shard_reader(client: RedisCluster, stream: str, block_ms: int, take_over: bool = False) -> StreamConsumer:
    """The consumer a scoring worker reads one owned shard with (``take_over``: the shard just taken)."""
    options = ConsumerSettings(stream, "scorers", "scorer", workers=1, batch_size=100, block_ms=block_ms, shutdown_timeout_s=5.0)
    return StreamConsumer(client, options, "scorer-0", WorkerProcess(0), take_over=take_over)


def test_a_read_blocked_on_a_slot_that_moves_away_ends_empty_and_the_next_follows_it(
    redis_cluster: RedisClusterServers, cluster_ns: Namespace
) -> None:
    """MIGRATE takes the shard stream's key off its node while the reader's XREADGROUP blocks there:
    the node answers UNBLOCKED. That read ends with nothing (never an error that would crash the
    worker), and the next one meets MOVED, waits it out and reads on the slot's new master."""
    stream = shard_stream(cluster_ns.stream, SHARDS, 0)
    client = connect_redis(redis_cluster.url, cluster=True)
    ensure_group(client, stream, "scorers")
    reader = shard_reader(client, stream, block_ms=30_000)
    slot = redis_cluster.slot_of(stream)
    source = redis_cluster.master_of_slot(slot)
    target = next(master for master in redis_cluster.masters_now() if master is not source)
    with ThreadPoolExecutor(1) as pool, source.client() as node:
        blocked = pool.submit(reader.read)
        wait_for(lambda: node.info("clients")["blocked_clients"] == 1, 10, message="the read blocking on the source")
        redis_cluster.migrate_slot(slot, target)
        assert len(blocked.result(timeout=10)) == 0
    entry_id = client.xadd(stream, {"data": b"after the move"}).decode()
    assert reader.read().ids == [entry_id]
    client.close()


def test_a_cluster_with_no_node_left_is_waited_out_never_a_crash(
    redis_cluster: RedisClusterServers, cluster_ns: Namespace
) -> None:
    """With every node gone, redis-py's cluster client ends a command with
    ``RedisClusterUnreachableError``, which is no ``redis.RedisError``: the worker waits it out like
    any outage until it is told to stop, and then stops with its batch left pending."""
    stream = shard_stream(cluster_ns.stream, SHARDS, 0)
    client = connect_redis(redis_cluster.url, cluster=True)
    client.xadd(stream, {"data": b"before"})
    reader = shard_reader(client, stream, block_ms=1)
    redis_cluster.kill()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(reader.until_done, lambda: client.xlen(stream), "redis")
        time.sleep(4)  # several failed attempts, each ending in an error from a cluster with no node
        assert not waiting.done(), waiting.exception()
        reader.process.stopping = True
        with pytest.raises(Stopping):
            waiting.result(timeout=30)
    client.close()


def test_a_group_whose_creation_died_with_its_master_is_recreated_by_the_new_owner(
    redis_cluster: RedisClusterServers, cluster_ns: Namespace
) -> None:
    """A worker takes a shard (its lease waited for until a replica held it) and creates the group,
    and the master dies before its replica has the XGROUP CREATE: the new owner's first claim on the
    promoted replica meets NOGROUP, recreates the group and reads the stream from its start."""
    stream = shard_stream(cluster_ns.stream, SHARDS, 0)
    client = connect_redis(redis_cluster.url, cluster=True)
    entry_id = client.xadd(stream, {"data": b"before the failover"}).decode()
    master = redis_cluster.master_of(stream)
    replica = redis_cluster.replicas_of(master)[0]
    with master.client() as node:
        assert node.execute_command("WAIT", 1, 5000) == 1  # the replica has the entry, not the group
        os.kill(replica.process.pid, signal.SIGSTOP)
        node.execute_command("CLIENT", "KILL", "TYPE", "replica")
    ensure_group(client, stream, "scorers")  # on the master alone
    master.kill()
    os.kill(replica.process.pid, signal.SIGCONT)
    slot = redis_cluster.slot_of(stream)
    wait_for(lambda: redis_cluster.master_of_slot(slot) is replica, 60, message="the replica promoted")
    # The claim of everything pending comes first; the outage until the slot map is learnt again is waited out.
    assert shard_reader(client, stream, block_ms=1, take_over=True).read().ids == [entry_id]
    client.close()
