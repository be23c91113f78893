"""`fraudd ingest` over real HTTP against the real Redis: status codes, auth, duplicates,
backpressure, batches, limits. Nothing invalid may reach the stream."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from fraudd.runtime.retention import trim_acked
from fraudd.scoring import decode

from .conftest import Namespace, wait_for
from .ingest_server import NOW, IngestServer, post, tx
from .services import RedisServer
from .streams import publish, valid_payloads


def stream_payloads(client: redis.Redis, ns: Namespace) -> list[bytes]:
    return [fields[b"data"] for _id, fields in client.xrange(ns.stream)]


@pytest.fixture
def server(ns: Namespace, tmp_path: Path):
    server = IngestServer.start(ns, tmp_path, "--workers", "1", "--max-batch", "5", "--client-timeout-s", "1")
    yield server
    assert server.stop() == 0, server.log()[-2000:]


def test_every_status_code(server: IngestServer, ns: Namespace, redis_client: redis.Redis) -> None:
    with server.client() as http:
        accepted = post(http, "/v1/transactions", tx("s1"))
        assert accepted.status_code == 202
        assert accepted.json() == {"id": accepted.json()["id"], "transaction_id": "s1"}
        duplicate = post(http, "/v1/transactions", tx("s1"))
        assert duplicate.status_code == 200
        assert duplicate.json() == {"duplicate": True, "id": accepted.json()["id"], "transaction_id": "s1"}
        conflict = post(http, "/v1/transactions", tx("s1", amount=99))
        assert conflict.status_code == 409
        assert conflict.json()["error"] == "conflict" and conflict.json()["field"] == "transaction_id"
        assert accepted.json()["id"] in conflict.json()["detail"]

        not_json = post(http, "/v1/transactions", b'{"transaction_id": ')
        assert not_json.status_code == 400 and not_json.json()["error"] == decode.REASON_NOT_JSON
        not_utf8 = post(
            http,
            "/v1/transactions",
            b'{"transaction_id": "\xff", "user_id": "u", "amount": 1, "merchant": "m", "timestamp": 1764385200}',
        )
        assert not_utf8.status_code == 400 and not_utf8.json()["error"] == decode.REASON_NOT_UTF8
        too_large = post(http, "/v1/transactions", tx("s2", merchant="x" * decode.MAX_PAYLOAD_BYTES))
        assert too_large.status_code == 413 and too_large.json()["error"] == decode.REASON_TOO_LARGE
        too_many = post(http, "/v1/transactions/batch", [tx(f"b{i}") for i in range(6)])
        assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_items"
        wrong_type = http.post("/v1/transactions", content=orjson.dumps(tx("s3")), headers={"Content-Type": "text/plain"})
        assert wrong_type.status_code == 415
        missing = post(http, "/v1/transactions", {"transaction_id": "s4", "user_id": "u", "merchant": "m", "timestamp": NOW})
        assert missing.status_code == 422
        assert missing.json() == {"error": decode.REASON_MISSING, "field": "amount", "detail": "required"}
        ill_typed = post(http, "/v1/transactions", tx("s5", timestamp="yesterday"))
        assert ill_typed.status_code == 422 and ill_typed.json()["field"] == "timestamp"
        nul = post(http, "/v1/transactions", tx("s6", merchant="a\u0000b"))
        assert nul.status_code == 422 and nul.json()["field"] == "merchant"
        assert http.get("/v1/nowhere").status_code == 404
        assert http.get("/v1/transactions").status_code == 405
        assert http.get("/healthz").text == "ok\n"
        openapi = http.get("/openapi.json").json()
        assert openapi["openapi"].startswith("3.") and "/v1/score" in openapi["paths"]
        metrics = http.get("/metrics").text
        assert 'fraudd_ingest_requests_total{route="/v1/transactions",status="422"} 3.0' in metrics
        assert 'fraudd_ingest_transactions_total{outcome="duplicate"} 1.0' in metrics

    # 408: a body announced but never sent in full within --client-timeout-s.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"transaction_id"'
        )
        reply = slow.recv(1000)
    assert reply.startswith(b"HTTP/1.1 408"), reply

    assert stream_payloads(redis_client, ns) == [orjson.dumps(tx("s1"))]


def test_a_client_trickling_its_headers_is_cut_off(server: IngestServer) -> None:
    """--client-timeout-s 1: a connection that never completes its request head is closed."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\n")
        with pytest.raises(OSError):
            while time.monotonic() - started < 8:
                time.sleep(0.25)
                slow.sendall(b"X-Slow: 1\r\n")
                slow.setblocking(False)
                try:
                    if slow.recv(100) == b"":
                        raise ConnectionResetError("closed by the server")
                except BlockingIOError:
                    pass
                finally:
                    slow.setblocking(True)
    assert time.monotonic() - started < 5


def test_batch_judges_each_item(server: IngestServer, ns: Namespace, redis_client: redis.Redis) -> None:
    with server.client() as http:
        post(http, "/v1/transactions", tx("b0"))
        items = [tx("b1"), 7, tx("b2", amount=-1), tx("b0"), tx("b1")]
        response = post(http, "/v1/transactions/batch", items)
        assert response.status_code == 200
        body = response.json()
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 2, 2)
        assert [r["status"] for r in body["results"]] == [202, 422, 422, 200, 200]
        assert body["results"][2]["field"] == "amount"
        assert body["results"][4]["id"] == body["results"][0]["id"]

        lines = b"\n".join([orjson.dumps(tx("n1")), b"", b"not json", orjson.dumps(tx("n2", user_id=""))]) + b"\n"
        ndjson = http.post("/v1/transactions/batch", content=lines, headers={"Content-Type": "application/x-ndjson"})
        assert [r["status"] for r in ndjson.json()["results"]] == [202, 400, 422]
        assert ndjson.json()["results"][2]["field"] == "user_id"

        assert post(http, "/v1/transactions/batch", {"not": "an array"}).status_code == 422
        assert post(http, "/v1/transactions/batch", b"[1, 2").status_code == 400

    written = stream_payloads(redis_client, ns)
    assert [orjson.loads(p)["transaction_id"] for p in written] == ["b0", "b1", "n1"]
    assert decode.decode_batch([str(i) for i in range(len(written))], written).rejected == []


def test_a_resent_transaction_id_is_judged_before_the_duplicate_check_and_another_body_conflicts(
    server: IngestServer, ns: Namespace, redis_client: redis.Redis
) -> None:
    """The same transaction again (in any key order and spacing, on any write route) is a
    duplicate; another body under its transaction_id is a 409 naming the conflict; an invalid one
    is refused as invalid, never answered as a duplicate."""
    original = tx("c1", lat=10.5, lon=20.25)
    with server.client() as http:
        first = post(http, "/v1/transactions", original)
        assert first.status_code == 202
        reordered = b"{\n" + b",\n".join(orjson.dumps({k: v})[1:-1] for k, v in reversed(original.items())) + b"\n}"
        assert post(http, "/v1/transactions", reordered).status_code == 200
        assert post(http, "/v1/score", original).json()["duplicate"] is True

        invalid = post(http, "/v1/transactions", {**original, "lon": 181})
        assert invalid.status_code == 422 and invalid.json()["field"] == "lon"
        for path in ("/v1/transactions", "/v1/score"):
            conflict = post(http, path, {**original, "amount": 1.0})
            assert conflict.status_code == 409, (path, conflict.text)
            assert conflict.json()["error"] == "conflict" and conflict.json()["field"] == "transaction_id"
            assert first.json()["id"] in conflict.json()["detail"]
        batch = post(http, "/v1/transactions/batch", [original, {**original, "merchant": "Other"}, tx("c2"), tx("c2", amount=2)])
        body = batch.json()
        assert [r["status"] for r in body["results"]] == [200, 409, 202, 409]
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 2)
        assert body["results"][1]["error"] == "conflict" and body["results"][1]["field"] == "transaction_id"
        metrics = http.get("/metrics").text
        assert 'fraudd_ingest_transactions_total{outcome="conflict"} 4.0' in metrics
    assert [orjson.loads(p)["transaction_id"] for p in stream_payloads(redis_client, ns)] == ["c1", "c2"]


def test_control_characters_in_identifiers_are_refused_naming_the_field(
    server: IngestServer, ns: Namespace, redis_client: redis.Redis
) -> None:
    with server.client() as http:
        for k, name in enumerate(decode.IDENTIFIERS):
            for char in ("\r\n", "\x00", "\x7f", "\x85"):
                fields = {name: f"x{char}y"} if name != "transaction_id" else {}
                body = tx(f"cc{k}" if name != "transaction_id" else f"cc{char}", **fields)
                for path in ("/v1/transactions", "/v1/score"):
                    response = post(http, path, body)
                    assert response.status_code == 422, (name, char, response.text)
                    assert (response.json()["error"], response.json()["field"]) == (decode.REASON_INVALID, name)
                item = post(http, "/v1/transactions/batch", [body]).json()["results"][0]
                assert (item["status"], item["field"]) == (422, name)
    assert stream_payloads(redis_client, ns) == []


def test_duplicate_of_a_transaction_the_worker_counted(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    """A transaction that reached the stream another way and was scored is a duplicate too."""
    from .services import drain

    payload = orjson.dumps(tx("w1"))
    publish(redis_client, ns.stream, [payload])
    drain(redis_client, ns, tmp_path, "--workers", "1")
    server = IngestServer.start(ns, tmp_path)
    try:
        with server.client() as http:
            response = post(http, "/v1/transactions", tx("w1"))
        assert response.status_code == 200 and response.json()["duplicate"] is True
        assert redis_client.xlen(ns.stream) == 1
    finally:
        server.stop()


def test_tls(ns: Namespace, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server = IngestServer.start(ns, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https")
    try:
        with server.client(verify=False) as http:
            assert post(http, "/v1/transactions", tx("tls1")).status_code == 202
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=3)
    finally:
        assert server.stop() == 0


def test_backpressure_on_group_lag(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    redis_client.xgroup_create(ns.stream, ns.group, id="0", mkstream=True)
    publish(redis_client, ns.stream, valid_payloads(20, "lag"))
    server = IngestServer.start(ns, tmp_path, "--max-lag", "10")
    try:
        with server.client() as http:
            wait_for(lambda: post(http, "/v1/transactions", tx("bp0")).status_code == 503, 10, message="backpressure")
            refused = post(http, "/v1/transactions/batch", [tx("bp1")])
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"] == "overloaded"
            # The group catches up (here: reads and acks everything); writes are accepted again.
            read = redis_client.xreadgroup(ns.group, "c", {ns.stream: ">"}, count=100)
            redis_client.xack(ns.stream, ns.group, *[i for i, _f in read[0][1]])
            wait_for(lambda: post(http, "/v1/transactions", tx("bp2")).status_code == 202, 10, message="backpressure off")
    finally:
        assert server.stop() == 0
    assert redis_client.xlen(ns.stream) == 21


def test_trims_only_what_every_group_acked(ns: Namespace, redis_client: redis.Redis) -> None:
    decoding = redis.Redis.from_url(ns.redis_url, protocol=2, decode_responses=True)
    ids = publish(redis_client, ns.stream, valid_payloads(3000, "trim"))
    assert trim_acked(decoding, ns.stream, 0) == 0  # no group: nobody acked anything
    redis_client.xgroup_create(ns.stream, ns.group, id="0")
    redis_client.xgroup_create(ns.stream, "other", id="0")
    redis_client.xreadgroup(ns.group, "c", {ns.stream: ">"}, count=2000)
    redis_client.xack(ns.stream, ns.group, *ids[:1500])  # 500 stay pending
    redis_client.xreadgroup("other", "c", {ns.stream: ">"}, count=2500)
    redis_client.xack(ns.stream, "other", *ids[:2500])
    assert trim_acked(decoding, ns.stream, 3600) == 0  # younger than the retention
    trimmed = trim_acked(decoding, ns.stream, 0)
    remaining = [i.decode() for i, _f in redis_client.xrange(ns.stream)]
    assert 0 < trimmed <= 1500 and remaining == ids[trimmed:]
    assert ids[1500] in remaining  # the oldest pending entry of fraud-group stays


def test_one_trim_takes_every_acked_entry_of_a_fast_stream(ns: Namespace, redis_client: redis.Redis) -> None:
    """Redis stops an approximate trim at about 10,000 entries unless told a limit: at 25,000
    transactions/s the stream would outgrow a housekeeping round every 5 s."""
    decoding = redis.Redis.from_url(ns.redis_url, protocol=2, decode_responses=True)
    redis_client.xgroup_create(ns.stream, ns.group, id="0", mkstream=True)
    with redis_client.pipeline(transaction=False) as pipe:
        for i in range(30_000):
            pipe.xadd(ns.stream, {"data": b"%d" % i})
        pipe.execute()
    read = redis_client.xreadgroup(ns.group, "c", {ns.stream: ">"}, count=30_000)
    redis_client.xack(ns.stream, ns.group, *[entry_id for entry_id, _fields in read[0][1]])
    trimmed = trim_acked(decoding, ns.stream, 0)
    assert trimmed > 29_000 and redis_client.xlen(ns.stream) == 30_000 - trimmed


def test_redis_outage_answers_503_then_recovers(dedicated_redis: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    # Nothing here reaches PostgreSQL: names of its own on the scratch Redis suffice.
    ns = Namespace(f"t{uuid.uuid4().hex[:10]}", redis_url=dedicated_redis.url)
    server = IngestServer.start(ns, tmp_path, "--workers", "1")
    try:
        with server.client() as http:
            assert post(http, "/v1/transactions", tx("r1")).status_code == 202
            dedicated_redis.kill()
            down = post(http, "/v1/transactions", tx("r2"))
            assert down.status_code == 503 and down.headers["Retry-After"] == "1"
            assert down.json()["error"] == "unavailable"
            assert post(http, "/v1/transactions/batch", [tx("r3")]).status_code == 503
            wait_for(lambda: http.get("/healthz").status_code == 503, 5, message="/healthz to say 503")
            # Generic words for whoever asks; the error text (address, port) only in the log.
            assert http.get("/healthz").text == "redis: unavailable\n"
            assert f"{dedicated_redis.port}" in server.log() and '"unhealthy"' in server.log()
            dedicated_redis.start()
            # The retry a gateway makes is written once; the decision channel is back too.
            wait_for(lambda: post(http, "/v1/transactions", tx("r2")).status_code == 202, 20, message="writes accepted again")
            wait_for(lambda: http.get("/healthz").status_code == 200, 20, message="healthy again")
            assert post(http, "/v1/transactions", tx("r2")).json()["duplicate"] is True
    finally:
        assert server.stop() == 0, server.log()[-2000:]
    assert [orjson.loads(p)["transaction_id"] for p in stream_payloads(dedicated_redis.client(), ns)] == ["r1", "r2"]


def test_healthz_probes_at_most_once_a_second(dedicated_redis: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    ns = Namespace(f"t{uuid.uuid4().hex[:10]}", redis_url=dedicated_redis.url)
    server = IngestServer.start(ns, tmp_path, "--workers", "1")
    client = dedicated_redis.client()
    try:
        with server.client() as http:
            client.config_resetstat()
            started = time.monotonic()
            answers = {http.get("/healthz").text for _ in range(60)}
            elapsed = time.monotonic() - started
        pings = int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))
    finally:
        assert server.stop() == 0, server.log()[-2000:]
    assert answers == {"ok\n"}
    assert pings <= elapsed + 2, (pings, elapsed)


def test_connections_beyond_the_cap_are_closed(ns: Namespace, tmp_path: Path) -> None:
    server = IngestServer.start(ns, tmp_path, "--workers", "1", "--max-connections", "3")

    def keep_alive() -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        conn.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        return conn

    def served(conn: socket.socket) -> bool:
        try:
            return conn.recv(200).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    try:
        held = [keep_alive() for _ in range(3)]
        assert all(served(conn) for conn in held)
        with keep_alive() as beyond:
            assert not served(beyond)
        held.pop().close()
        wait_for(lambda: served(keep_alive()), 10, message="a connection once one closed")
        assert '"connection_cap"' in server.log()
        for conn in held:
            conn.close()
    finally:
        assert server.stop() == 0, server.log()[-2000:]


def test_no_response_names_the_server_software(server: IngestServer) -> None:
    with server.client() as http:
        assert http.get("/healthz").headers["Server"] == "fraudd"
    # aiohttp answers a malformed request itself.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        reply = raw.recv(1000)
    assert reply.startswith(b"HTTP/1.0 400") and b"Server: fraudd\r\n" in reply, reply
    assert b"aiohttp" not in reply and b"Python" not in reply


def test_labels_reach_the_labels_stream_all_or_none(server: IngestServer, ns: Namespace, redis_client: redis.Redis) -> None:
    with server.client() as http:
        written = post(
            http,
            "/v1/labels",
            [
                {"transaction_id": "l1", "label": "fraud", "source": "chargeback", "reported_at": NOW - 10},
                {"transaction_id": "l2", "label": 0},
            ],
        )
        assert written.status_code == 202 and written.json()["accepted"] == 2, written.text
        refused = post(
            http, "/v1/labels", [{"transaction_id": "l3", "label": "fraud"}, {"transaction_id": "l4", "label": "maybe"}]
        )
        assert refused.status_code == 422 and refused.json()["error"] == "invalid_label", refused.text
        assert refused.json()["detail"].startswith("item 1:") and "label" in refused.json()["detail"]
        assert post(http, "/v1/labels", {"transaction_id": "l5", "label": True}).status_code == 202
        assert post(http, "/v1/labels", [{"transaction_id": f"m{i}", "label": "legit"} for i in range(6)]).status_code == 413
        assert post(http, "/v1/labels", b"[{").status_code == 400
    entries = redis_client.xrange(ns.labels_stream)
    assert written.json()["ids"] == [entry_id.decode() for entry_id, _fields in entries[:2]]
    documents = [orjson.loads(fields[b"data"]) for _id, fields in entries]
    assert [(d["transaction_id"], d["label"], d["source"]) for d in documents] == [
        ("l1", "fraud", "chargeback"),
        ("l2", "legit", "api"),
        ("l5", "fraud", "api"),
    ]
    assert documents[0]["reported_at"] == NOW - 10
