"""`POST /v1/score`: the decision the worker stored, delivered per batch over sharded pub/sub;
the stored decision for a duplicate; the fallback on timeout, the transaction still scored once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis

from fraudd.ingest.decisions import Decisions
from fraudd.runtime.redis_clients import AsyncNodes

from .conftest import Namespace, wait_for
from .ingest_server import IngestServer, post, tx
from .services import DaemonProcess, start, stop
from .streams import fully_drained


def stored_rows(ns: Namespace) -> dict[str, dict]:
    rows = ns.sql(
        "SELECT transaction_id, stream_id, decision, score::float8, reasons, model_version, explanation FROM transactions"
    )
    return {
        r[0]: {
            "id": r[1],
            "decision": r[2],
            "score": round(float(r[3]), 6),
            "reasons": list(r[4]),
            "model_version": r[5],
            "explanation": r[6],
        }
        for r in rows
    }


def decision_of(answer: dict) -> dict:
    return {k: answer[k] for k in ("id", "decision", "score", "reasons", "model_version", "explanation")}


def ready_scoring(ns: Namespace, tmp_path: Path, *args: str) -> DaemonProcess:
    """``fraudd run`` with its workers ready: on a loaded box its start-up alone can outlast a
    decision timeout, and a request sent before would time out."""
    daemon = start(ns, tmp_path, *args)
    wait_for(lambda: '"event": "ready"' in daemon.log(), 60, message="the scoring workers to be ready")
    return daemon


@pytest.fixture
def scoring(ns: Namespace, redis_client: redis.Redis, tmp_path: Path):
    daemon = ready_scoring(ns, tmp_path, "--workers", "2")
    yield daemon
    wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to be drained")
    stop(daemon)


def test_score_answers_the_stored_decision(ns: Namespace, scoring, tmp_path: Path) -> None:
    server = IngestServer.start(ns, tmp_path, "--workers", "2", "--decision-timeout-ms", "5000")
    # Risky enough to be declined or reviewed: large amounts at a gambling merchant, several at once.
    items = [
        tx(
            f"sc{i}",
            user_id=f"user_{i % 7}",
            amount=[12.5, 4999.0, 80.0][i % 3],
            mcc=["5411", "7995", "5999"][i % 3],
            channel="ecom",
        )
        for i in range(60)
    ]
    try:
        with server.client() as http, ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda item: post(http, "/v1/score", item), items))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
            answers = [a.json() for a in answers]
            assert not any(a["timed_out"] or a["duplicate"] for a in answers)
            rows = stored_rows(ns)
            for answer in answers:
                assert decision_of(answer) == rows[answer["transaction_id"]]
                assert answer["latency_ms"] > 0
            assert {a["decision"] for a in answers} >= {"approve"}
            # A flagged decision answers with the explanation it was stored with.
            assert all((a["explanation"] is None) == (a["decision"] == "approve") for a in answers)

            again = post(http, "/v1/score", items[1]).json()
            assert again["duplicate"] is True and not again["timed_out"]
            assert decision_of(again) == rows["sc1"]
            # Each process adds its counts to the shared metrics every half second.
            wait_for(
                lambda: 'fraudd_ingest_decisions_total{outcome="answered"} 61.0' in http.get("/metrics").text,
                5,
                message="61 answered decisions in /metrics",
            )
    finally:
        assert server.stop() == 0
    assert len(stored_rows(ns)) == 60


def test_timeout_answers_the_fallback_and_scores_once(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    server = IngestServer.start(ns, tmp_path, "--decision-timeout-ms", "150", "--fallback-decision", "decline")
    try:
        with server.client() as http:
            answer = post(http, "/v1/score", tx("late1")).json()
            assert answer["timed_out"] is True and answer["decision"] == "decline" and answer["score"] is None
            # asyncio runs a timer up to its clock resolution (≈ 1 ms) early: 149.997 ms was seen.
            assert 149 <= answer["latency_ms"] < 1000
            # Nobody scored it yet: a retry is a duplicate, and times out the same way.
            retry = post(http, "/v1/score", tx("late1")).json()
            assert retry["duplicate"] is True and retry["timed_out"] is True
            assert 'fraudd_ingest_decisions_total{outcome="timed_out"} 2.0' in http.get("/metrics").text
        daemon = start(ns, tmp_path, "--workers", "1")
        try:
            wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to be drained")
        finally:
            stop(daemon)
        rows = stored_rows(ns)
        assert list(rows) == ["late1"] and rows["late1"]["id"] == answer["id"]
        with server.client() as http:
            stored = post(http, "/v1/score", tx("late1")).json()
        assert stored["duplicate"] is True and not stored["timed_out"] and decision_of(stored) == rows["late1"]
    finally:
        assert server.stop() == 0
    assert redis_client.xlen(ns.stream) == 1


def test_sharded_input(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    """--shards 3: each transaction goes to its user's shard stream, once; decisions come back
    from every shard's workers on that shard's channel."""
    from fraudd.keys import shard_of, shard_stream

    shards = "3"
    daemon = ready_scoring(ns, tmp_path, "--workers", "2", "--shards", shards)
    server = IngestServer.start(ns, tmp_path, "--workers", "2", "--shards", shards, "--decision-timeout-ms", "5000")
    items = [tx(f"sh{i}", user_id=f"user_{i}") for i in range(30)]
    try:
        with server.client() as http, ThreadPoolExecutor(10) as pool:
            answers = [a.json() for a in pool.map(lambda item: post(http, "/v1/score", item), items[:15])]
            batch = post(http, "/v1/transactions/batch", items[10:] + items[:2]).json()
        assert not any(a["timed_out"] for a in answers)
        assert (batch["accepted"], batch["duplicates"]) == (15, 7)
        wait_for(lambda: len(stored_rows(ns)) == 30, 60, message="30 rows")
        rows = stored_rows(ns)
        for answer in answers:
            assert decision_of(answer) == rows[answer["transaction_id"]]
    finally:
        assert server.stop() == 0, server.log()[-2000:]
        stop(daemon)
    for k in range(3):
        written = {orjson.loads(f[b"data"])["user_id"] for _i, f in redis_client.xrange(shard_stream(ns.stream, 3, k))}
        assert written == {f"user_{i}" for i in range(30) if shard_of(f"user_{i}", 3) == k}
    assert not redis_client.exists(ns.stream)


def test_a_stop_while_the_channels_are_being_subscribed_ends_within_a_turn(ns: Namespace) -> None:
    """An ingest stopped as it starts meets its decision channels half subscribed, the connection
    maybe in its handshake: its stop ends there, not at the supervisor's kill."""

    async def start_then_stop(delay: float) -> None:
        nodes = AsyncNodes(ns.redis_url, socket_timeout=5, socket_connect_timeout=3)
        decisions = Decisions(nodes, [f"{ns.stream}:decisions"])
        decisions.start()
        await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(decisions.stop(), 5)  # a turn of the subscription's loops is a second
        finally:
            await nodes.aclose()

    # Stops spread over the subscription's first milliseconds, several times over.
    for delay in [ms / 1000 for ms in range(20)] * 5:
        asyncio.run(start_then_stop(delay))
