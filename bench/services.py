"""Private Redis and PostgreSQL servers for one benchmark invocation (``--private-services``).

On a shared machine other people's work runs on the shared servers too, and neither Redis's CPU
counters and commandstats nor PostgreSQL's processes can tell whose work it was. A private pair,
configured like the shared one (the settings that move performance are copied from it), puts
only this run's work on them. The private PostgreSQL also turns on ``track_commit_timestamp``,
which gives every row's exact commit time (``bench latency``) and cannot be switched on in the
shared server without a restart. Both are removed with their directories afterwards.

With ``cluster_masters`` the private Redis is a Redis Cluster of that many masters (and
``cluster_replicas`` replicas each), every node configured like the shared Redis: what ``bench
throughput --redis-cluster-masters`` scales out on.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

from bench.redis_cluster import RedisClusterServers
from fraudd.localservers import PostgresServer, RedisServer, scratch_dir

REDIS_SETTINGS = ("appendonly", "appendfsync", "save", "hz", "io-threads")
PG_SETTINGS = (
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "max_wal_size",
    "min_wal_size",
    "checkpoint_timeout",
    "wal_buffers",
    "work_mem",
    "autovacuum",
    "max_connections",
    "TimeZone",
)


@contextmanager
def private(
    shared_redis_url: str,
    shared_postgres_url: str,
    echo,
    cluster_masters: int = 0,
    cluster_replicas: int = 0,
    pg_overrides: dict[str, str] | None = None,
) -> Iterator[tuple[str, str, dict]]:
    """(redis URL, PostgreSQL URL, settings used) of a fresh private pair, torn down on exit; the
    URL lists every node, comma-separated, when the Redis is a cluster. ``pg_overrides``: settings
    of the private PostgreSQL that differ from the shared one's (a tuning to price)."""
    shared = redis.Redis.from_url(shared_redis_url, decode_responses=True)
    redis_settings = {name: shared.config_get(name).get(name) for name in REDIS_SETTINGS}
    redis_settings = {name: value for name, value in redis_settings.items() if value is not None}
    with psycopg.connect(shared_postgres_url, autocommit=True) as conn:
        pg_settings = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in PG_SETTINGS}
    pg_settings["track_commit_timestamp"] = "on"
    pg_settings.update(pg_overrides or {})
    directory = scratch_dir("fraudd-bench-")
    (directory / "pg").mkdir()
    if cluster_masters:
        redis_server = RedisClusterServers(directory, cluster_masters, cluster_replicas, persistent=False, config=redis_settings)
        described = f"redis cluster of {cluster_masters} masters x {cluster_replicas} replicas"
        settings = {"redis": redis_settings, "redis_cluster": {"masters": cluster_masters, "replicas": cluster_replicas}}
    else:
        redis_server = RedisServer(directory, persistent=False, config=redis_settings)
        described = "redis"
        settings = {"redis": redis_settings}
    postgres = PostgresServer(directory / "pg", settings=pg_settings)
    try:
        redis_server.start()
        postgres.init()
        postgres.start()
        echo(f"private services: {described} {redis_server.url}, postgresql :{postgres.port} ({directory})")
        yield redis_server.url, postgres.url, {**settings, "postgresql": pg_settings}
    finally:
        postgres.stop()
        redis_server.kill()
        shutil.rmtree(directory, ignore_errors=True)
