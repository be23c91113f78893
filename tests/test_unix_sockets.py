"""fraudd on one box through Unix domain sockets: ``REDIS_URL=unix:///path/redis.sock`` and a
PostgreSQL URL whose host is the server's socket directory, for the scoring workers' hot path, the
asyncio ingest, and ``fraudd status``; and a Redis Cluster refused a socket seed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .conftest import Namespace, migrate, wait_for
from .ingest_server import IngestServer, post, tx
from .services import PostgresServer, RedisServer, stop
from .streams import fully_drained
from .test_ingest_decisions import decision_of, ready_scoring, stored_rows


@pytest.fixture
def socket_ns(volatile_redis: RedisServer, dedicated_postgres: PostgresServer) -> Iterator[Namespace]:
    """A migrated namespace whose every ``fraudd`` command reaches both servers through their sockets
    only: neither URL names a TCP address."""
    namespace = Namespace(
        f"t{uuid.uuid4().hex[:10]}", redis_url=volatile_redis.socket_url, postgres_url=dedicated_postgres.socket_url
    )
    migrate(namespace)
    yield namespace
    with volatile_redis.client() as client:
        namespace.drop(client)


def test_scoring_ingest_and_status_over_unix_sockets(socket_ns: Namespace, volatile_redis: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(socket_ns.redis_url, protocol=2)
    daemon = ready_scoring(socket_ns, tmp_path, "--workers", "2")
    server = IngestServer.start(socket_ns, tmp_path, "--workers", "1", "--decision-timeout-ms", "5000")
    try:
        with server.client() as http:
            # Several per user: the features read and commit of the workers' batches go over the socket.
            answers = [post(http, "/v1/score", tx(f"ux{i}", user_id=f"user_{i % 3}", amount=10.0 + i)) for i in range(12)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        rows = stored_rows(socket_ns)
        assert {a.json()["transaction_id"] for a in answers} == set(rows)
        assert all(not a.json()["timed_out"] and decision_of(a.json()) == rows[a.json()["transaction_id"]] for a in answers)
    finally:
        assert server.stop() == 0, server.log()[-2000:]
        wait_for(lambda: fully_drained(client, socket_ns), 60, message="the stream to be drained")
        stop(daemon)
        client.close()

    status = socket_ns.fraudd("status", timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"redis      up    {socket_ns.redis_url}" in status.stdout
    assert f"postgres   up    {socket_ns.postgres_url}" in status.stdout
    assert "lag 0, pending 0" in status.stdout


def test_a_redis_cluster_is_refused_a_socket_seed(ns: Namespace) -> None:
    # Cluster nodes name each other by host and port: the client would fall back to 127.0.0.1:6379.
    result = ns.fraudd("status", "--redis-cluster", "--shards", "4", "--redis-url", "unix:///run/redis/redis.sock", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--redis-cluster needs redis:// or rediss:// seed URLs" in result.stderr
