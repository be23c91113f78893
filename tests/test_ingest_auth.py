"""`fraudd ingest`'s API keys over real HTTP against the real Redis: who may write, what, and how a
signed request is checked."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson
import redis

from fraudd.ingest.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

from .conftest import Namespace, wait_for, worker_pids
from .ingest_server import IngestServer, post, tx

KEY = "k-" + "s3cr3t" * 4
SECRET = "signing-" + "n0t-the-t0ken" * 3


def stream_transaction_ids(client: redis.Redis, ns: Namespace) -> list[str]:
    return [orjson.loads(fields[b"data"])["transaction_id"] for _id, fields in client.xrange(ns.stream)]


def test_api_keys_and_reload(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# gateway\n{KEY}\n")
    server = IngestServer.start(ns, tmp_path, "--api-keys-file", str(keys_file))
    try:
        with server.client() as http:
            missing = post(http, "/v1/transactions", tx("a1"))
            assert missing.status_code == 401 and missing.json() == {"error": "unauthorized"}
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            bad = post(http, "/v1/transactions", tx("a1"), {"Authorization": "Bearer " + KEY[:-1] + "x"})
            assert bad.status_code == 401 and bad.json() == {"error": "unauthorized"}
            assert post(http, "/v1/transactions", tx("a1"), {"Authorization": "Basic " + KEY}).status_code == 401
            good = post(http, "/v1/transactions", tx("a1"), {"Authorization": "Bearer " + KEY})
            assert good.status_code == 202

            keys_file.write_text("rotated-key\n")
            server.signal(signal.SIGHUP)
            wait_for(
                lambda: post(http, "/v1/transactions", tx("a2"), {"Authorization": "Bearer rotated-key"}).status_code == 202,
                10,
                message="the rotated key to be accepted",
            )
            assert post(http, "/v1/transactions", tx("a3"), {"Authorization": "Bearer " + KEY}).status_code == 401
    finally:
        assert server.stop() == 0
    assert stream_transaction_ids(redis_client, ns) == ["a1", "a2"]


def test_signed_requests(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    server = IngestServer.start(
        ns, tmp_path, "--require-signature", "--signature-window-s", "60", FRAUDD_API_KEYS=f"gateway:{KEY}:{SECRET}"
    )
    auth = {"Authorization": "Bearer " + KEY}

    def signed(body: bytes, stamp: int, secret: str = SECRET, method: str = "POST", target: str = "/v1/transactions") -> dict:
        return {**auth, TIMESTAMP_HEADER: str(stamp), SIGNATURE_HEADER: sign(secret.encode(), stamp, method, target, body)}

    try:
        with server.client() as http:
            body = orjson.dumps(tx("g1"))
            now = int(time.time())
            assert post(http, "/v1/transactions", body, signed(body, now)).status_code == 202
            replayed = post(http, "/v1/transactions", body, signed(body, now))
            assert replayed.status_code == 403 and replayed.json() == {"error": "forbidden"}
            other = orjson.dumps(tx("g2"))
            assert post(http, "/v1/transactions", other, auth).status_code == 403  # unsigned
            assert post(http, "/v1/transactions", other, signed(body, now + 1)).status_code == 403  # another body's
            assert post(http, "/v1/transactions", other, signed(other, now - 120)).status_code == 403  # stale
            assert post(http, "/v1/transactions", other, signed(other, now, secret="wrong")).status_code == 403
            # Whoever saw the bearer token cannot sign: the token is not the signing secret.
            assert post(http, "/v1/transactions", other, signed(other, now, secret=KEY)).status_code == 403
            # A signature holds for one method and request target only.
            assert post(http, "/v1/transactions", other, signed(other, now, target="/v1/score")).status_code == 403
            assert post(http, "/v1/transactions", other, signed(other, now, target="/v1/transactions?x=1")).status_code == 403
            assert post(http, "/v1/transactions", other, signed(other, now, method="PUT")).status_code == 403
            unauthenticated = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: signed(other, now)[SIGNATURE_HEADER]}
            assert post(http, "/v1/transactions", other, unauthenticated).status_code == 401
            assert post(http, "/v1/transactions", other, signed(other, now + 2)).status_code == 202
            score = orjson.dumps(tx("g3"))
            assert post(http, "/v1/score", score, signed(score, now, target="/v1/score")).status_code == 200
    finally:
        assert server.stop() == 0
    assert stream_transaction_ids(redis_client, ns) == ["g1", "g2", "g3"]
    assert '"reason": "bad signature", "key_id": "gateway"' in server.log()


def test_signatures_need_a_signing_secret_for_every_key(ns: Namespace, tmp_path: Path) -> None:
    refused = ns.fraudd("ingest", "--require-signature", "--listen", "127.0.0.1:0", timeout=30, FRAUDD_API_KEYS=KEY)
    assert refused.returncode == 2 and "keys without a signing secret: sha256:" in refused.stderr, refused.stderr
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"gateway:{KEY}:{SECRET}\n")
    server = IngestServer.start(ns, tmp_path, "--require-signature", "--api-keys-file", str(keys_file), "--workers", "1")
    try:
        keys_file.write_text(f"gateway:{KEY}:{SECRET}\nunsigned:other-token:\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: len(reloads_refused(server)) >= 2, 10, message="the reload to be refused")
        assert "keys without a signing secret: unsigned" in reloads_refused(server)[0]["reason"]
        with server.client() as http:
            body = orjson.dumps(tx("n1"))
            assert post(http, "/v1/transactions", body, {"Authorization": "Bearer other-token"}).status_code == 401
    finally:
        assert server.stop() == 0


def test_a_key_line_that_cannot_be_parsed_stops_start_up(ns: Namespace, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    for line, reason in (
        ("gateway:token", "expected TOKEN or KEY_ID:TOKEN:SIGNING_SECRET"),
        ("gateway:token:secret:transactions+relabel", "unknown scope relabel"),
        (":token:secret", "KEY_ID and TOKEN must not be empty"),
    ):
        keys_file.write_text(f"# keys\n{line}\n")
        refused = ns.fraudd("ingest", "--listen", "127.0.0.1:0", "--api-keys-file", str(keys_file), timeout=30)
        assert refused.returncode == 2 and f"{keys_file}:2: {reason}" in refused.stderr, refused.stderr
    keys_file.write_text("a:same-token:s1\nb:same-token:s2\n")
    refused = ns.fraudd("ingest", "--listen", "127.0.0.1:0", "--api-keys-file", str(keys_file), timeout=30)
    assert refused.returncode == 2 and "two keys share a token" in refused.stderr, refused.stderr


def log_records(server: IngestServer) -> list[dict]:
    return [orjson.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def reloads_refused(server: IngestServer) -> list[dict]:
    """The log's refused key reloads, supervisor's and server processes' alike."""
    return [r for r in log_records(server) if r.get("event") == "keys_reload_refused"]


def test_a_reload_that_would_leave_no_key_is_refused(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    server = IngestServer.start(ns, tmp_path, "--api-keys-file", str(keys_file), "--workers", "1")
    try:
        with server.client() as http:
            for number, emptied in enumerate(("", "# every key revoked\n\n   # for now\n"), 1):
                keys_file.write_text(emptied)
                server.signal(signal.SIGHUP)
                # Once by the supervisor, once (or twice: the group's signal and the forwarded one) by the server process.
                wait_for(lambda n=number: len(reloads_refused(server)) >= 2 * n, 10, message="the reload to be refused")
                assert post(http, "/v1/transactions", tx(f"e{number}")).status_code == 401
                assert post(http, "/v1/transactions", tx(f"k{number}"), {"Authorization": "Bearer " + KEY}).status_code == 202
    finally:
        assert server.stop() == 0
    refused = reloads_refused(server)
    assert {r["level"] for r in refused} == {"ERROR"} and {r["worker"] for r in refused} == {"supervisor", "ingest-0"}
    assert refused[0]["reason"] == "no API key left: authentication would turn off" and refused[0]["keys"] == 1
    assert stream_transaction_ids(redis_client, ns) == ["k1", "k2"]


def test_a_removed_key_stays_removed_when_a_server_process_is_respawned(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("key-a\nkey-b\n")
    server = IngestServer.start(ns, tmp_path, "--api-keys-file", str(keys_file), "--workers", "1")
    try:
        with server.client() as http:
            assert post(http, "/v1/transactions", tx("r1"), {"Authorization": "Bearer key-b"}).status_code == 202
            keys_file.write_text("key-a\n")
            server.signal(signal.SIGHUP)
            wait_for(
                lambda: post(http, "/v1/transactions", tx("r2"), {"Authorization": "Bearer key-b"}).status_code == 401,
                10,
                message="key-b to be refused",
            )
            (first,) = worker_pids(server.process.pid)
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: worker_pids(server.process.pid) not in ([], [first]), 20, message="the server process respawned")
            assert post(http, "/v1/transactions", tx("r3"), {"Authorization": "Bearer key-a"}).status_code == 202
            assert post(http, "/v1/transactions", tx("r4"), {"Authorization": "Bearer key-b"}).status_code == 401
    finally:
        assert server.stop() == 0
    written = stream_transaction_ids(redis_client, ns)  # r2 as well, if it came before the reload
    assert "r3" in written and "r4" not in written


def test_key_scopes(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"# id:token:signing secret[:scopes]\ngateway:tok-gateway:{SECRET}\nlabeller:tok-labeller::labels\n"
        "tok-bare  # a bare token, as before\n"
    )
    server = IngestServer.start(ns, tmp_path, "--api-keys-file", str(keys_file), "--decision-timeout-ms", "20")

    def as_key(token: str) -> dict:
        return {"Authorization": "Bearer " + token}

    label = {"transaction_id": "s1", "label": "fraud", "reported_at": int(time.time()) - 60}
    try:
        with server.client() as http:
            for token in ("tok-gateway", "tok-bare"):
                forbidden = post(http, "/v1/labels", label, as_key(token))
                assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden", forbidden.text
                assert post(http, "/v1/transactions", tx(token), as_key(token)).status_code == 202
                assert post(http, "/v1/transactions/batch", [tx(token + "-b")], as_key(token)).status_code == 200
                assert post(http, "/v1/score", tx(token + "-s"), as_key(token)).status_code == 200
            for path, body in (("/v1/transactions", tx("x1")), ("/v1/transactions/batch", [tx("x2")]), ("/v1/score", tx("x3"))):
                assert post(http, path, body, as_key("tok-labeller")).status_code == 403
            assert post(http, "/v1/labels", label, as_key("tok-labeller")).status_code == 202
    finally:
        assert server.stop() == 0
    assert [orjson.loads(f[b"data"])["transaction_id"] for _i, f in redis_client.xrange(ns.labels_stream)] == ["s1"]
    assert len(stream_transaction_ids(redis_client, ns)) == 6


def test_a_label_reported_in_the_future_is_recorded_no_later_than_the_clock_allows(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    server = IngestServer.start(ns, tmp_path, "--workers", "1")
    now = int(time.time())
    try:
        with server.client() as http:
            for txid, reported_at in (("f0", now + 3600), ("f1", "2099-01-01T00:00:00Z"), ("f2", now + 60)):
                posted = post(http, "/v1/labels", {"transaction_id": txid, "label": "fraud", "reported_at": reported_at})
                assert posted.status_code == 202, posted.text
        after = time.time()
    finally:
        assert server.stop() == 0
    recorded = {
        d["transaction_id"]: d["reported_at"]
        for d in (orjson.loads(f[b"data"]) for _i, f in redis_client.xrange(ns.labels_stream))
    }
    # Beyond the skew the reporter's clock may have: the clock plus the skew; within it, as sent.
    assert all(now + 300 <= recorded[txid] <= after + 300 for txid in ("f0", "f1")), recorded
    assert recorded["f2"] == now + 60


def test_refuses_to_listen_beyond_loopback_without_keys(ns: Namespace, tmp_path: Path) -> None:
    refused = ns.fraudd("ingest", "--listen", "0.0.0.0:0", timeout=30)
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    server = IngestServer.start(ns, tmp_path, "--insecure-no-auth", host="0.0.0.0")
    assert server.stop() == 0
