"""`fraudd ingest`'s API keys over real HTTP against the real Redis: who may write, what, and how a
signed request is checked."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import redis

from fraudd.ingest.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

from .conftest import Namespace, wait_for
from .ingest_server import IngestServer, post, tx

KEY = "k-" + "s3cr3t" * 4


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
    server = IngestServer.start(ns, tmp_path, "--require-signature", "--signature-window-s", "60", FRAUDD_API_KEYS=KEY)
    auth = {"Authorization": "Bearer " + KEY}

    def signed(body: bytes, stamp: int, key: str = KEY) -> dict:
        return {**auth, TIMESTAMP_HEADER: str(stamp), SIGNATURE_HEADER: sign(key.encode(), stamp, body)}

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
            assert post(http, "/v1/transactions", other, signed(other, now, key="wrong")).status_code == 403
            assert (
                post(
                    http,
                    "/v1/transactions",
                    other,
                    {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(KEY.encode(), now, other)},
                ).status_code
                == 401
            )
            assert post(http, "/v1/transactions", other, signed(other, now + 2)).status_code == 202
    finally:
        assert server.stop() == 0
    assert redis_client.xlen(ns.stream) == 2


def test_refuses_to_listen_beyond_loopback_without_keys(ns: Namespace, tmp_path: Path) -> None:
    refused = ns.fraudd("ingest", "--listen", "0.0.0.0:0", timeout=30)
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    server = IngestServer.start(ns, tmp_path, "--insecure-no-auth", host="0.0.0.0")
    assert server.stop() == 0
