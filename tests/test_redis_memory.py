"""Redis memory: an evicting Redis is refused at start-up, and a full one is an outage, not a crash.

Each test runs its own ``redis-server`` (no persistence: only memory matters here) and the shared
PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fraudd.generator import GeneratorConfig, TransactionGenerator

from .conftest import POSTGRES_URL, wait_for
from .services import (
    RedisServer,
    dedicated_namespace,
    free_port,
    start,
    stop,
)
from .streams import dlq, fully_drained, publish
from .test_observability import http_get

TRANSACTIONS = 20_000
WORKERS = 2
# Room for a few batches' behaviour states and markers above what the stream alone takes.
HEADROOM_BYTES = 1_500_000


@pytest.mark.parametrize(
    "command", [("run", "--workers", "1"), ("labels", "--workers", "1"), ("ingest", "--workers", "1", "--listen", "127.0.0.1:0")]
)
def test_an_evicting_redis_is_refused_in_one_line(volatile_redis: RedisServer, command: tuple[str, ...]) -> None:
    client = volatile_redis.client()
    ns = dedicated_namespace(volatile_redis, POSTGRES_URL)
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        result = ns.fraudd(*command, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "maxmemory-policy is allkeys-lru" in lines[0], result.stderr
        assert "set maxmemory-policy noeviction" in lines[0]
    finally:
        ns.drop(client)


def test_a_full_redis_is_waited_out_and_nothing_is_lost(volatile_redis: RedisServer, tmp_path: Path) -> None:
    client = volatile_redis.client()
    ns = dedicated_namespace(volatile_redis, POSTGRES_URL)
    generated = TransactionGenerator(GeneratorConfig(seed=12)).generate(TRANSACTIONS)
    publish(client, ns.stream, generated.payloads())
    client.config_set("maxmemory", client.info("memory")["used_memory"] + HEADROOM_BYTES)
    port = free_port()
    daemon = start(ns, tmp_path, "--workers", str(WORKERS), "--metrics-port", str(port))
    try:
        wait_for(lambda: "redis out of memory" in daemon.log(), 60, message="the workers to meet a full Redis")
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 503, 20, message="/healthz to say 503")
        body = http_get(f"http://127.0.0.1:{port}/healthz")[1]
        assert "redis: out of memory" in body and "maxmemory" in body, body
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert re.search(r'fraudd_errors_total\{component="redis",kind="OutOfMemoryError"\} [1-9]', metrics), metrics[-2000:]
        assert re.search(r"fraudd_redis_memory_max_bytes \d", metrics)
        status = ns.fraudd("status", timeout=30).stdout
        assert re.search(r"memory +used [\d.,]+ MiB of maxmemory [\d.,]+ MiB, policy noeviction", status), status
        assert re.search(r"input [\d,]+ tx/s over the last second: dedup markers for the 3600 s window need", status), status
        assert not fully_drained(client, ns)

        client.config_set("maxmemory", 0)
        wait_for(lambda: fully_drained(client, ns), 120, message="the stream to be drained once Redis has room")
        assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    finally:
        log = stop(daemon)
    # One line per worker that met it, not one per retry; no worker died, nothing dead-lettered.
    assert 1 <= log.count("redis out of memory") <= WORKERS, log[-3000:]
    assert '"worker_died"' not in log
    assert dlq(client, ns) == []
    assert ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0] == (TRANSACTIONS, TRANSACTIONS)
    ns.drop(client)
