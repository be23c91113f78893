"""``fraudd ingest`` on a Redis Cluster (``--redis-cluster``): every transaction a client was told
is accepted is stored exactly once, and ``/v1/score`` answers what PostgreSQL stored, while one
shard's slot moves to another master (ASK, TRYAGAIN, MOVED, its decision channels unsubscribed by
the node) and then the master serving some shards is SIGKILLed and its replica promoted.

A real cluster of 3 masters and 3 replicas, ``fraudd run`` and ``fraudd ingest`` as processes, and
clients that retry what was answered 503 (as ``Retry-After`` asks) sending single transactions,
synchronous scores and batches, with re-sends. Sized to run in seconds, not for throughput.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
from redis.cluster import RedisCluster

from bench.redis_cluster import RedisClusterServers
from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import shard_streams

from .conftest import Namespace, wait_for
from .ingest_server import IngestServer, post
from .services import DaemonProcess, stop
from .streams import fully_drained

SHARDS = 8
TRANSACTIONS = 3000
SCORED, SINGLE = 300, 300  # the first through /v1/score, the next one by one, the rest in batches
BATCH = 100
RESENT = 0.1  # a batch of them, the rest one by one
# The requests from these fractions of the traffic on wait for the slot move, then the failover,
# to have begun: both meet traffic in flight.
MOVE_AT, FAIL_OVER_AT = 0.3, 0.6
RETRY_FOR_S = 30.0


class Client:
    """An HTTP client of the ingest that retries what was answered 503, and counts those; the
    request at ``position`` waits for every gate ``(start, event)`` with ``start <= position``."""

    def __init__(self, http: httpx.Client, gates: list[tuple[int, threading.Event]]) -> None:
        self.http = http
        self.gates = gates
        self.unavailable = 0
        self.statuses: Counter[int] = Counter()
        self.done = 0
        self._lock = threading.Lock()

    def send_at(self, position: int, path: str, body: list | bytes) -> tuple[str, httpx.Response]:
        for start, gate in self.gates:
            if position >= start:
                assert gate.wait(60)
        return path, self.send(path, body)

    def send(self, path: str, body: list | bytes) -> httpx.Response:
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            response = post(self.http, path, body)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            assert response.headers["Retry-After"], response.text
            with self._lock:
                self.unavailable += 1
            time.sleep(0.05)  # sooner than Retry-After asks: the test has seconds, not minutes
        with self._lock:
            self.statuses[response.status_code] += 1
            self.done += 1
        return response


def test_ingest_through_a_slot_move_and_a_failover_stores_every_accepted_transaction_once(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster, cluster_ns: Namespace, tmp_path: Path
) -> None:
    ns = cluster_ns
    generated = TransactionGenerator(GeneratorConfig(seed=41, tx_per_second=50.0)).generate(TRANSACTIONS)
    payloads, txids = generated.payloads(), generated.transaction_ids
    rng = np.random.default_rng(5)
    resent = rng.choice(TRANSACTIONS, int(TRANSACTIONS * RESENT), replace=False).tolist()
    # Each request as (path, body): scores, singles and batches interleaved, re-sends among them.
    requests = [("/v1/score", payloads[i]) for i in range(SCORED)]
    requests += [("/v1/transactions", payloads[i]) for i in range(SCORED, SCORED + SINGLE)]
    requests += [
        ("/v1/transactions/batch", [orjson.loads(p) for p in payloads[i : i + BATCH]])
        for i in range(SCORED + SINGLE, TRANSACTIONS, BATCH)
    ]
    requests += [("/v1/score" if i < SCORED else "/v1/transactions", payloads[i]) for i in resent[BATCH:]]
    requests.append(("/v1/transactions/batch", [orjson.loads(payloads[i]) for i in resent[:BATCH]]))
    requests = [requests[k] for k in rng.permutation(len(requests))]
    streams = shard_streams(ns.stream, SHARDS)

    scoring = DaemonProcess.start(
        ns,
        tmp_path / "run.log",
        "--workers",
        "2",
        "--shards",
        str(SHARDS),
        "--lease-ms",
        "1500",
        "--batch-size",
        "300",
        "--retention-s",
        "1",
    )
    ingest = IngestServer.start(ns, tmp_path, "--workers", "2", "--shards", str(SHARDS), "--decision-timeout-ms", "10000")
    try:
        with ingest.client() as http, ThreadPoolExecutor(8) as pool:
            moving, failing = threading.Event(), threading.Event()
            client = Client(http, [(int(MOVE_AT * len(requests)), moving), (int(FAIL_OVER_AT * len(requests)), failing)])
            answers = pool.map(lambda position: client.send_at(position, *requests[position]), range(len(requests)))
            wait_for(lambda: client.done >= (MOVE_AT - 0.05) * len(requests), 60, message="traffic under way")
            slot = redis_cluster.slot_of(streams[1])
            source, doomed = redis_cluster.master_of_slot(slot), redis_cluster.master_of(streams[0])
            target = next(master for master in redis_cluster.masters_now() if master not in (source, doomed))

            def half_moved() -> None:
                moving.set()
                time.sleep(0.1)  # a slow reshard: requests meet the slot half moved

            redis_cluster.migrate_slot(slot, target, between_steps=half_moved)
            moving.set()
            wait_for(lambda: client.done >= (FAIL_OVER_AT - 0.05) * len(requests), 60, message="traffic after the move")
            failing.set()
            redis_cluster.fail_over(doomed)
            answers = [(path, response.json()) for path, response in answers]
            labelled = post(
                http, "/v1/labels", [{"transaction_id": t, "label": "fraud", "source": "chargeback"} for t in txids[:20]]
            )
            assert labelled.status_code == 202, labelled.text
            # Every decision channel subscribed again, on the nodes now serving the slots.
            wait_for(lambda: http.get("/healthz").status_code == 200, 10, message="a healthy ingest")
        wait_for(lambda: fully_drained(cluster_client, ns, SHARDS), 60, interval=0.2, message="the drain")
        # Acknowledged entries older than --retention-s are trimmed, shard by shard.
        wait_for(
            lambda: sum(cluster_client.xlen(s) for s in streams) < TRANSACTIONS, 15, message="the shard streams to be trimmed"
        )
    finally:
        ingest_code = ingest.stop()
        log = stop(scoring)
    assert ingest_code == 0 and "Traceback" not in ingest.log(), ingest.log()[-3000:]
    # The slot move and the failover reached the clients as 503s they retried, never as a 500.
    assert client.unavailable > 0 and set(client.statuses) <= {200, 202}, client.statuses
    assert '"outage"' in ingest.log() and '"outage"' in log

    # Every transaction stored exactly once, as the entry the ingest answered for it ...
    stored = {
        t: (stream_id, decision, round(float(score), 6), list(reasons), version)
        for t, stream_id, decision, score, reasons, version in ns.sql(
            "SELECT transaction_id, stream_id, decision, score, reasons, model_version FROM transactions"
        )
    }
    assert len(stored) == ns.sql("SELECT count(*) FROM transactions")[0][0] == TRANSACTIONS
    assert stored.keys() == set(txids)
    ids: dict[str, set[str]] = {}
    for path, answer in answers:
        for item in answer["results"] if path.endswith("batch") else [answer]:
            assert item["id"], item
            ids.setdefault(item["transaction_id"], set()).add(item["id"])
    assert ids.keys() == set(txids)
    assert all(ids[t] == {row[0]} for t, row in stored.items())
    # ... and no entry written twice on the shard streams (trimmed or not, XINFO counts every one).
    added = sum(cluster_client.xinfo_stream(stream)["entries-added"] for stream in streams)
    assert added == TRANSACTIONS

    # /v1/score answered the stored decision, for a re-sent transaction too.
    scores = [answer for path, answer in answers if path == "/v1/score"]
    assert len(scores) == SCORED + sum(i < SCORED for i in resent[BATCH:])
    assert not any(answer["timed_out"] for answer in scores)
    for answer in scores:
        assert (answer["id"], answer["decision"], answer["score"], answer["reasons"], answer["model_version"]) == stored[
            answer["transaction_id"]
        ]

    labels = [orjson.loads(fields[b"data"]) for _id, fields in cluster_client.xrange(ns.labels_stream)]
    assert [label["transaction_id"] for label in labels] == txids[:20]
