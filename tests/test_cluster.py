"""Redis Cluster (``--redis-cluster``): DESIGN.md's six guarantees by exact counts on a real cluster
of 3 masters and 3 replicas, started by the test, while things go wrong.

Two supervisors (different CONSUMER_ID) share 8 shards; their workers are SIGKILLed now and then;
one supervisor is killed for good with its workers (the other takes its shards over once their
leases expire); the master serving the fraud stream's slot (and some shards') is SIGKILLed and its
replica promoted while scoring goes on, and every primary loses the Function library. The traffic is sized for CI (tens of seconds on 2 busy
cores), not for throughput: see bench/ for that.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.localservers import RedisClusterServers, scratch_dir
from fraudd.runtime.redis_clients import redis_client
from fraudd.scoring.features import _USER_INFIX, LIBRARY_NAME

from .conftest import Namespace, kill_workers_until, migrated_namespace, wait_for, worker_pids
from .services import DaemonProcess, stop
from .streams import alerts, dlq, fully_drained

SHARDS = 8
TRANSACTIONS = 40_000
PUBLISHED_FIRST = 0.6  # the rest goes out after the failover, through the promoted replica
LEASE_MS = 1500
DAEMON_ARGS = ("--workers", "2", "--shards", str(SHARDS), "--lease-ms", str(LEASE_MS), "--batch-size", "300")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(scratch_dir("fraudd-cluster-"))
    try:
        servers.start()
        yield servers
    finally:
        servers.kill()
        shutil.rmtree(servers.directory, ignore_errors=True)


@pytest.fixture
def cluster_client(redis_cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    client = redis_client(redis_cluster.url, cluster=True)
    yield client
    client.close()


@pytest.fixture
def cluster_ns(redis_client: redis.Redis, redis_cluster: RedisClusterServers) -> Iterator[Namespace]:
    for namespace in migrated_namespace(redis_client, redis_url=redis_cluster.url):
        namespace.extra_env["REDIS_CLUSTER"] = "1"
        yield namespace


def test_every_guarantee_through_kills_a_lost_supervisor_and_a_failover(
        redis_cluster: RedisClusterServers, cluster_client: RedisCluster, cluster_ns: Namespace, tmp_path: Path) -> None:
    ns = cluster_ns
    generated = TransactionGenerator(GeneratorConfig(seed=31, tx_per_second=50.0)).generate(TRANSACTIONS)
    faults = generated.with_faults(0.01, 0.005, np.random.default_rng(7))
    kept = [(p, reason) for p, reason in zip(faults.payloads, faults.reason) if p is not None]
    payloads = [p for p, _reason in kept]
    txids, users = generated.transaction_id.tolist(), generated.user_id.tolist()
    expected_rows = {txids[row]: users[row] for row, reason in zip(faults.row.tolist(), faults.reason) if reason is None}
    publisher = Publisher(cluster_client, ns.stream, SHARDS)
    first = int(len(payloads) * PUBLISHED_FIRST)
    ids = publisher.publish(payloads[:first])

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
        ids += publisher.publish(payloads[first:])
        # As a node restarted without persistence would: the workers load the library again.
        cluster_client.function_flush("SYNC")
        kills += kill_workers_until(lambda: fully_drained(cluster_client, ns, SHARDS), a.pid, 8, rng)
        wait_for(lambda: fully_drained(cluster_client, ns, SHARDS), 120, interval=0.5, message="the drain")
    finally:
        b.kill_group()
        log = stop(a)
    assert kills >= 2 and log.count('"worker_died"') >= 2
    assert '"shard_taken"' in log and '"outage"' in log, log[-3000:]
    invalid = {entry_id for entry_id, (_p, reason) in zip(ids, kept) if reason is not None}

    # 1. one row per distinct valid transaction_id
    stored = ns.sql("SELECT transaction_id, decision FROM transactions")
    assert len(stored) == len(expected_rows) and {t for t, _ in stored} == expected_rows.keys()
    decision = dict(stored)
    # 2. and 6. one alert per non-approved id, carrying PostgreSQL's decision
    sent = alerts(cluster_client, ns)
    assert sorted(a["transaction_id"] for a in sent) == sorted(t for t, d in decision.items() if d != "approve")
    assert all(a["decision"] == decision[a["transaction_id"]] for a in sent)
    # 3. each invalid entry dead-lettered once (entry ids are per shard stream: count them as pairs)
    letters = Counter(d["source_id"].decode() for d in dlq(cluster_client, ns))
    assert letters == Counter(invalid)
    # 4. nothing pending (fully drained) and 5. behaviour counted each transaction once, per shard
    markers = sum(cluster_client.hlen(bucket) for bucket in
                  cluster_client.scan_iter(match=f"fraudd:{ns.stream}:*:seen:*", count=10_000))
    assert markers == len(expected_rows)
    for user, count in Counter(expected_rows.values()).items():
        keys = Keys(shard_stream(ns.stream, SHARDS, shard_of(user, SHARDS)), ns.fraud_stream, ns.dlq_stream)
        raw = cluster_client.get(keys.prefix + _USER_INFIX + user)
        assert struct.unpack_from("<dI", raw)[1] == count, user

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
