"""The services around the scoring on a Redis Cluster (``--redis-cluster``, 3 masters + 3 replicas
started by the module): ``fraudd labels`` and ``fraudd label`` counting confirmed fraud in every
shard's slot, ``fraudd dlq list|replay|purge`` routing replays to their shards, ``fraudd status``
per node, and ``fraudd alerts`` delivering each alert once while the fraud stream's master fails
over and a dead channel's alerts go to the DLQ once each. The tests share the module's cluster,
each in namespaces (key tags) of its own; the failover test, after which a master has no replica,
comes last.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis.cluster import RedisCluster

from bench.redis_cluster import RedisClusterServers
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_of, shard_stream
from fraudd.learning.labels import parse_labels
from fraudd.localservers import scratch_dir
from fraudd.runtime.consumer import StreamConsumer, ensure_group
from fraudd.runtime.deadletters import REASON_MAX_DELIVERIES, DeadLetter, DeadLetterSettler, marker_prefix
from fraudd.runtime.process import WorkerProcess
from fraudd.runtime.redis_clients import connect_redis
from fraudd.scoring import decode
from fraudd.scoring.confirmed import KINDS
from fraudd.settings import ConsumerSettings

from .alerting import HttpReceiver, webhook_channel
from .conftest import Namespace, running, wait_for
from .services import DaemonProcess, stop
from .streams import NOW, feed_labels_service, fully_drained, payload, wait_labels_stored
from .test_alerts import write_config
from .test_alerts_service import start_alerts

SHARDS = 8
RUN_ARGS = ("--workers", "2", "--lease-ms", "1500", "--batch-size", "200")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """The module's cluster (conftest's is one per test): 2-3 s to start, once."""
    yield from running(RedisClusterServers(scratch_dir("fraudd-cluster-")))


@pytest.fixture
def ns(cluster_ns: Namespace) -> Namespace:
    """The cluster namespace with every command on 8 shards."""
    cluster_ns.extra_env["FRAUDD_SHARDS"] = str(SHARDS)
    return cluster_ns


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


def transactions(count: int, prefix: str, users: int = 100, big_every: int = 0) -> list[bytes]:
    """Valid input messages over ``users`` users (so over every shard); every ``big_every``-th one
    for 20,000 (what a channel with ``min_amount`` receives)."""
    return [
        payload(
            f"{prefix}_{i}",
            user=f"{prefix}_user_{i % users}",
            merchant=f"m{i % 7}",
            amount=20_000.0 if big_every and i % big_every == 0 else round(5 + (i * 7.31) % 900, 2),
            ts=NOW - 3000 + i % 3000,
        )
        for i in range(count)
    ]


def score(ns: Namespace, client: RedisCluster, tmp_path: Path, *args: str) -> str:
    """``fraudd run`` until every shard is drained; returns its log."""
    daemon = DaemonProcess.start(ns, tmp_path / "run.log", *RUN_ARGS, *args)
    try:
        wait_for(lambda: fully_drained(client, ns, SHARDS), 60, interval=0.3, message="every shard drained")
    finally:
        log = stop(daemon)
    return log


def dead_letters(client: RedisCluster, ns: Namespace) -> list[dict[str, bytes]]:
    return [{k.decode(): v for k, v in fields.items()} for _id, fields in client.xrange(ns.dlq_stream)]


def test_a_read_whose_dead_letters_were_written_but_not_acked_writes_none_again(
    ns: Namespace, redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    client = connect_redis(redis_cluster.url, cluster=True)
    options = ConsumerSettings(
        ns.labels_stream, "readers", "reader", workers=1, batch_size=100, block_ms=10, claim_idle_ms=1000, shutdown_timeout_s=5.0
    )
    ensure_group(client, options.stream, options.group)
    ids = [client.xadd(options.stream, {"data": f"entry {i}"}).decode() for i in range(5)]
    consumer = StreamConsumer(client, options, "reader-0", WorkerProcess(0))
    assert consumer.read().ids == ids
    letters = [DeadLetter(entry_id, {"data": b"bad", "reason": "invalid_json", "source_id": entry_id}) for entry_id in ids[:2]]
    settler = DeadLetterSettler(consumer, ns.dlq_stream)
    # On a cluster the letters go first, in the DLQ's slot; the worker dies before the ack.
    assert settler.settle([], letters) == (2, 0)

    respawned = StreamConsumer(client, options, "reader-0", WorkerProcess(0))
    again = respawned.read()
    assert again.ids == ids and set(again.deliveries.values()) == {2}
    assert DeadLetterSettler(respawned, ns.dlq_stream).settle(again.ids, letters) == (0, 5)
    client.close()
    assert [f[b"source_id"].decode() for _i, f in cluster_client.xrange(ns.dlq_stream)] == ids[:2]
    assert cluster_client.xpending(options.stream, options.group)["pending"] == 0


def test_labels_are_stored_once_and_counted_in_every_shards_slot(
    ns: Namespace, cluster_client: RedisCluster, tmp_path: Path
) -> None:
    Publisher(cluster_client, ns.stream, SHARDS).publish(transactions(400, "lab"))
    score(ns, cluster_client, tmp_path)
    labels, _errors = parse_labels(
        [
            {
                "transaction_id": f"lab_{i}",
                "label": "fraud" if i % 2 else "legit",
                "source": "chargeback",
                "reported_at": NOW - 60,
            }
            for i in range(0, 120, 3)
        ]
    )
    feed_labels_service(cluster_client, ns, labels, resent=10)
    daemon = ns.start_command("labels", "--workers", "2")
    try:
        wait_labels_stored(cluster_client, ns, 40, 30)
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr[-3000:]
    assert ns.sql("SELECT count(*) FROM label_history")[0][0] == 40
    assert sorted(letter["reason"].decode() for letter in dead_letters(cluster_client, ns)) == ["invalid_field", "invalid_json"]
    # A file of labels (`fraudd label`) goes through the cluster too: two more frauds.
    (tmp_path / "more.csv").write_text("transaction_id,label\nlab_200,fraud\nlab_201,fraud\n")
    loaded = ns.fraudd("label", "--file", str(tmp_path / "more.csv"))
    assert loaded.returncode == 0 and "2 labels (2 fraud)" in loaded.stdout, loaded.stdout + loaded.stderr

    # Every shard counts every confirmed fraud (any shard may see the merchant next), in its own slot.
    expected = Counter(
        merchant
        for (merchant,) in ns.sql(
            "SELECT t.merchant FROM transactions t JOIN labels l USING (transaction_id) WHERE l.label = 'fraud'"
        )
    )
    assert sum(expected.values()) == 22
    for k in range(SHARDS):
        keys = Keys(shard_stream(ns.stream, SHARDS, k), "", "")
        merchants = f"{keys.prefix}confirmed:{KINDS[0]}"
        assert cluster_client.keyslot(merchants) == cluster_client.keyslot(keys.stream)
        counted = {m.decode(): len(pairs.split(b";")) for m, pairs in cluster_client.hgetall(merchants).items()}
        assert counted == dict(expected), k


def test_dlq_list_replay_to_the_shards_and_purge_then_status_per_node(
    ns: Namespace, cluster_client: RedisCluster, redis_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    # One user per shard whose first entry became poison while a dependency misbehaved (its consumers kept dying).
    users = {}
    for i in range(1000):
        users.setdefault(shard_of(f"poison_user_{i}", SHARDS), f"poison_user_{i}")
        if len(users) == SHARDS:
            break
    poison = {f"poison_{k}": user for k, user in users.items()}
    publisher = Publisher(cluster_client, ns.stream, SHARDS)
    publisher.publish([payload(txid, user=user, amount=77.0) for txid, user in poison.items()])
    for stream in (shard_stream(ns.stream, SHARDS, k) for k in range(SHARDS)):
        cluster_client.xgroup_create(stream, ns.group, id="0")
        [[_stream, [(entry_id, _fields)]]] = cluster_client.xreadgroup(ns.group, "crasher", {stream: ">"}, count=1)
        cluster_client.execute_command("XCLAIM", stream, ns.group, "crasher", 0, entry_id, "RETRYCOUNT", 9)
    publisher.publish([*transactions(300, "dlq"), b"not json", b"[1]", b"{}"])
    score(ns, cluster_client, tmp_path, "--claim-idle-ms", "300", "--max-deliveries", "3")
    reasons = Counter(letter["reason"].decode() for letter in dead_letters(cluster_client, ns))
    assert reasons == {
        REASON_MAX_DELIVERIES: SHARDS,
        decode.REASON_NOT_JSON: 1,
        decode.REASON_NOT_OBJECT: 1,
        decode.REASON_MISSING: 1,
    }, reasons

    listed = ns.fraudd("dlq", "list", "--reason", REASON_MAX_DELIVERIES)
    assert listed.returncode == 0 and f"{SHARDS} shown, {SHARDS + 3} in {ns.dlq_stream}" in listed.stderr, listed.stderr
    assert len(listed.stdout.splitlines()) == SHARDS and all(REASON_MAX_DELIVERIES in line for line in listed.stdout.splitlines())
    # Replayed twice at once (say, two operators): each transaction is still scored once, in its shard.
    first = next(i for i, f in cluster_client.xrange(ns.dlq_stream) if f[b"reason"] == b"max_deliveries")
    cluster_client.xadd(ns.dlq_stream, cluster_client.xrange(ns.dlq_stream, first, first)[0][1])
    replayed = ns.fraudd("dlq", "replay", "--reason", REASON_MAX_DELIVERIES)
    assert replayed.returncode == 0 and f"replayed {SHARDS + 1} entries" in replayed.stdout, replayed.stderr
    score(ns, cluster_client, tmp_path)
    rows = ns.sql("SELECT transaction_id, user_id, stream_id FROM transactions WHERE starts_with(transaction_id, 'poison_')")
    assert sorted(txid for txid, _user, _id in rows) == sorted(poison)
    for txid, user, stream_id in rows:
        [(_id, fields)] = cluster_client.xrange(shard_stream(ns.stream, SHARDS, shard_of(user, SHARDS)), stream_id, stream_id)
        assert orjson.loads(fields[b"data"])["transaction_id"] == txid
    assert ns.sql("SELECT count(*) FROM transactions")[0][0] == 300 + SHARDS

    purged = ns.fraudd("dlq", "purge", "--reason", decode.REASON_NOT_JSON)
    assert purged.returncode == 0 and "purged 1 entries" in purged.stdout, purged.stderr
    assert "purged 2 entries" in ns.fraudd("dlq", "purge", "--all").stdout
    assert cluster_client.xlen(ns.dlq_stream) == 0

    # Status: the totals, then each primary with the shards it serves, its lag and its memory.
    status = ns.fraudd("status", timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    nodes = re.findall(r"^node +(\S+): shards ([\d ]+|none)(.*): lag (\d+), pending (\d+), input", status.stdout, re.MULTILINE)
    masters = {f"127.0.0.1:{redis_cluster.master_of(shard_stream(ns.stream, SHARDS, k)).port}" for k in range(SHARDS)}
    assert len(nodes) == 3 and masters <= {name for name, *_rest in nodes}, status.stdout
    assert sorted(int(k) for _name, shards, *_rest in nodes if shards != "none" for k in shards.split()) == list(range(SHARDS))
    assert all(lag == "0" and pending == "0" for *_rest, lag, pending in nodes), status.stdout
    assert sum(ns.fraud_stream in others for _n, _s, others, *_r in nodes) == 1, status.stdout
    assert status.stdout.count("           memory used") == 3, status.stdout


def test_each_alert_delivered_once_through_a_failover_and_a_dead_channel_dead_lettered_once(
    ns: Namespace, cluster_client: RedisCluster, redis_cluster: RedisClusterServers, receiver: HttpReceiver, tmp_path: Path
) -> None:
    secret = "FRAUDD_WEBHOOK_SECRET"
    config = write_config(
        tmp_path,
        # The default timeout: the receiver, verifying 3,000 signatures in the test's process, may be
        # slow to answer on a busy box, and every alert may have only two attempts.
        webhook_channel(receiver.url("/hook"), "ops", secret)
        + webhook_channel("http://127.0.0.1:9/hook", "gone", secret, min_amount=10000, retry_base_s=0.02, retry_max_s=0.1),
    )
    payloads = transactions(3000, "al", users=300, big_every=100)
    publisher = Publisher(cluster_client, ns.stream, SHARDS)
    publisher.publish(payloads[:1500])
    # Every transaction alerts: the webhook gets one per transaction, the dead channel the 30 big ones.
    scoring = DaemonProcess.start(ns, tmp_path / "run.log", *RUN_ARGS, "--review-threshold", "0.000001")
    alerts_log = tmp_path / "alerts.log"
    alerting = start_alerts(ns, config, alerts_log, "--workers", "2", "--batch-size", "200", "--max-attempts", "2")
    try:
        wait_for(lambda: len(receiver.accepted) >= 500, 30, interval=0.2, message="alerts flowing")
        redis_cluster.fail_over(redis_cluster.master_of(ns.fraud_stream))
        publisher.publish(payloads[1500:])
        wait_for(lambda: len(receiver.accepted) == 3000, 60, interval=0.3, message="every alert at the receiver")
        wait_for(lambda: cluster_client.xlen(ns.dlq_stream) == 30, 30, interval=0.3, message="the dead channel's letters")
        wait_for(
            lambda: (
                fully_drained(cluster_client, ns, SHARDS)
                and cluster_client.xpending(ns.fraud_stream, "fraudd-alerts")["pending"] == 0
            ),
            30,
            message="all acked",
        )
    finally:
        alerting.send_signal(signal.SIGTERM)
        try:
            alerting.wait(30)
        except subprocess.TimeoutExpired:
            alerting.kill()
        stop(scoring)
    log = alerts_log.read_text()
    assert alerting.returncode == 0, log[-3000:]
    assert '"worker_died"' not in log and '"worker_crashed"' not in log, log[-3000:]
    assert '"outage"' in log and '"recovered"' in log, log[-3000:]  # the fraud stream's master was away a while

    stored = dict(ns.sql("SELECT transaction_id, decision FROM transactions"))
    assert len(stored) == 3000 and "approve" not in stored.values()
    assert sorted(receiver.accepted) == sorted(f"{txid}:ops" for txid in stored)
    # A webhook arrives again only as the delivery contract allows: under the same webhook-id, after an
    # attempt the receiver answered too late for (its timeout on record), never through the failover.
    timed_out = dict(
        ns.sql(
            "SELECT transaction_id || ':ops', attempts FROM alert_deliveries WHERE channel = 'ops' AND last_error = 'timed out'"
        )
    )
    assert all(timed_out.get(webhook_id, 0) > times for webhook_id, times in receiver.repeats.items()), (
        receiver.repeats,
        timed_out,
    )
    assert all(body["decision"] == stored[body["transaction_id"]] for body in receiver.accepted.values())
    rows = ns.sql("SELECT channel, status, count(*) FROM alert_deliveries GROUP BY 1, 2 ORDER BY 1")
    assert rows == [("gone", "failed", 30), ("ops", "delivered", 3000)], rows
    letters = dead_letters(cluster_client, ns)
    assert {letter["reason"] for letter in letters} == {b"alert_undeliverable"}
    assert sorted(orjson.loads(letter["data"])["transaction_id"] for letter in letters) == sorted(
        f"al_{i}" for i in range(0, 3000, 100)
    )

    # The channel is fixed: a replay makes its deliveries due again and forgets their markers, so a
    # second give-up would be dead-lettered again.
    markers = f"{marker_prefix(ns.fraud_stream, ns.dlq_stream)}*:gone"
    assert len(list(cluster_client.scan_iter(match=markers, target_nodes=RedisCluster.PRIMARIES))) == 30
    replayed = ns.fraudd("dlq", "replay", "--reason", "alert_undeliverable")
    assert replayed.returncode == 0 and "30 alert deliveries due again" in replayed.stdout, replayed.stderr
    assert cluster_client.xlen(ns.dlq_stream) == 0
    assert not list(cluster_client.scan_iter(match=markers, target_nodes=RedisCluster.PRIMARIES))
    assert ns.sql("SELECT status, attempts, count(*) FROM alert_deliveries WHERE channel = 'gone' GROUP BY 1, 2") == [
        ("pending", 0, 30)
    ]
