"""Random bodies and headers against the real server: never a 500, and nothing reaches the stream
that the worker would dead-letter. Then the whole way: 50,000 transactions over HTTP from
concurrent clients through `fraudd ingest` and `fraudd run`, each stored exactly once."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fraudd.scoring import decode

from .conftest import Namespace, wait_for
from .ingest_server import NOW, IngestServer, tx
from .services import start, stop
from .streams import fully_drained

KEY = "fuzz-key-0123456789"
ANSWERS = {200, 202, 400, 401, 405, 409, 413, 415, 422}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_values = (
    st.text(max_size=70)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.just("2025-11-29T03:00:00Z")
    | st.just("2025-11-29T03:00:00")
    | st.just("a\u0000b")
    | st.floats(min_value=978307200.0, max_value=4102444800.0)
    | json_values
)
required = ("transaction_id", "user_id", "amount", "merchant", "timestamp")


@st.composite
def transactions(draw) -> dict:
    """A valid transaction with some fields replaced, dropped, or added."""
    # Mostly fresh ids: repeated ones are duplicates, answered without a write.
    item = tx(
        draw(st.uuids().map(str) | st.text(min_size=1, max_size=64)),
        amount=draw(st.floats(min_value=0.01, max_value=1e9)),
        timestamp=draw(st.integers(min_value=NOW - 86400, max_value=NOW)),
    )
    for name in draw(st.lists(st.sampled_from(required + ("currency", "mcc", "country", "lat", "card_id", "x")), max_size=3)):
        if draw(st.booleans()):
            item[name] = draw(field_values)
        else:
            item.pop(name, None)
    return item


def serialize(value) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits: spell them out
        return str(value).encode() if isinstance(value, int) else b"{}"


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(serialize),
    transactions().map(serialize),
    transactions().map(serialize),
    st.lists(transactions() | json_values, max_size=8).map(serialize),
    st.lists(transactions().map(serialize), max_size=5).map(b"\n".join),
)
header_text = st.text(alphabet=string.printable.strip() + " ", max_size=40).map(str.strip)  # h11 refuses padded values
# Mostly usable media types and keys, so that many requests get as far as validation and the stream.
content_types = st.one_of(
    st.just("application/json"),
    st.just("application/json"),
    st.sampled_from(
        [
            "application/x-ndjson",
            "application/json; charset=utf-8",
            "text/plain",
            "",
            "application/JSON",
            "multipart/form-data; boundary=x",
        ]
    ),
    header_text,
)
authorizations = st.one_of(
    st.just("Bearer " + KEY),
    st.just("Bearer " + KEY),
    st.sampled_from(["bearer " + KEY, "Bearer", "Basic " + KEY, ""]),
    header_text,
)


@pytest.fixture
def fuzz_server(ns: Namespace, redis_client: redis.Redis, tmp_path: Path):
    server = IngestServer.start(ns, tmp_path, "--max-batch", "6", "--decision-timeout-ms", "20", FRAUDD_API_KEYS=KEY)
    yield server
    assert server.stop() == 0, server.log()[-3000:]
    # The generated requests did reach the stream, not only the refusals.
    assert redis_client.xlen(ns.stream) > 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    path=st.sampled_from(["/v1/transactions", "/v1/transactions/batch", "/v1/score"]),
    body=bodies,
    content_type=content_types,
    authorization=authorizations,
    extra=st.dictionaries(
        st.sampled_from(["X-Fraudd-Signature", "X-Fraudd-Timestamp", "Content-Encoding", "Accept", "X-Anything"]),
        header_text,
        max_size=2,
    ),
)
def test_random_requests_never_fail_or_poison_the_stream(
    fuzz_server: IngestServer,
    ns: Namespace,
    redis_client: redis.Redis,
    path: str,
    body: bytes,
    content_type: str,
    authorization: str,
    extra: dict,
) -> None:
    import httpx

    headers = {**extra, "Content-Type": content_type, "Authorization": authorization}
    response = httpx.post(fuzz_server.url + path, content=body, headers=headers, timeout=10)
    assert response.status_code in ANSWERS, (response.status_code, response.text)
    if response.status_code >= 400 and response.status_code != 405:
        assert response.json()["error"]
    entries = redis_client.xrange(ns.stream)
    payloads = [fields[b"data"] for _id, fields in entries]
    rejected = decode.decode_batch([i.decode() for i, _f in entries], payloads).rejected
    assert rejected == [], rejected


async def _send(url: str, items: list[dict], batch_size: int, concurrency: int) -> list[int]:
    """Post ``items``: batches of ``batch_size`` (1: single posts), ``concurrency`` at a time."""
    statuses: list[int] = []
    queue: asyncio.Queue = asyncio.Queue()
    for start_at in range(0, len(items), batch_size):
        queue.put_nowait(items[start_at : start_at + batch_size])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client() -> None:
            while not queue.empty():
                chunk = queue.get_nowait()
                path, body = ("/v1/transactions", chunk[0]) if batch_size == 1 else ("/v1/transactions/batch", chunk)
                while True:
                    async with session.post(
                        url + path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
                    ) as response:
                        await response.read()
                        if response.status != 503:  # backpressure: retry, as a gateway would
                            statuses.append(response.status)
                            break
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


def test_fifty_thousand_over_http_stored_exactly_once(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    items = [
        tx(f"e2e_{i}", user_id=f"user_{i % 3000}", amount=round(5 + (i * 7.31) % 900, 2), timestamp=NOW - 3600 + i % 3600)
        for i in range(50_000)
    ]
    daemon = start(ns, tmp_path, "--workers", "2")
    server = IngestServer.start(ns, tmp_path, "--workers", "2", "--max-batch", "500")
    try:

        async def everything() -> tuple[list[int], list[int], list[int]]:
            return await asyncio.gather(
                _send(server.url, items[:40_000], 500, 4),  # batches
                _send(server.url, items[40_000:], 1, 32),  # single posts
                _send(server.url, items[39_000:41_000], 1, 8),  # retries of both kinds: duplicates
            )

        batches, singles, retries = asyncio.run(everything())
        assert set(batches) == {200} and set(singles) <= {200, 202} and set(retries) <= {200, 202}
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to be drained")
    finally:
        assert server.stop() == 0, server.log()[-3000:]
        stop(daemon)
    assert redis_client.xlen(ns.stream) == 50_000
    ((rows, distinct),) = ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")
    assert rows == distinct == 50_000
    assert redis_client.xlen(ns.dlq_stream) == 0
