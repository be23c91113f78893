"""What every service checks before it forks, and the metrics directory it prepares first.

A bad setting or an unusable dependency becomes one line naming the option (``ConfigError``)
instead of a crash loop of workers. Nothing here imports prometheus-client at import time: it must
be imported only after ``prepare_metrics_dir`` has set its directory, and ``prepare_metrics_dir``
refuses to run once it was.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from .settings import ConfigError, PostgresSettings, RedisSettings


def prepare_metrics_dir() -> None:
    """Give prometheus-client an empty multiprocess directory before anything imports it.

    It picks its storage at import time, and every forked worker then writes its own files there
    for the supervisor's ``/metrics`` to sum. Without ``--metrics-listen`` nothing is exported and
    the metrics stay in process memory.
    """
    if "prometheus_client" in sys.modules:
        # Its storage is chosen already: the workers' metrics would never reach /metrics.
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="fraudd-metrics-"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    atexit.register(shutil.rmtree, directory, True)


def check_dependencies(
    redis_settings: RedisSettings, postgres: PostgresSettings, streams: list[str], group: str, start: str = "0"
) -> None:
    """Redis answers without an evicting policy (and ``group`` exists on each of ``streams``, created
    at ``start`` if new), PostgreSQL answers with every migration applied."""
    from .runtime.consumer import ensure_group
    from .runtime.probes import redis_memory
    from .runtime.redis_clients import REDIS_FAILURES, connect_redis

    client = connect_redis(redis_settings.url, redis_settings.cluster)
    try:
        client.ping()
        eviction = redis_memory(client).eviction_problem()
        for stream in streams:
            ensure_group(client, stream, group, start)
    except REDIS_FAILURES as exc:
        raise ConfigError(f"--redis-url / REDIS_URL: cannot use {redact(redis_settings.url)}: {exc}") from None
    finally:
        client.close()
    if eviction:
        raise ConfigError(f"--redis-url / REDIS_URL: {eviction}")
    with connect_postgres(postgres) as conn:
        check_migrated(conn, postgres)


def check_migrated(conn: psycopg.Connection, postgres: PostgresSettings) -> None:
    """Every migration is applied to ``postgres``'s schema (``conn`` connects to it)."""
    from .schema import MigrationError, pending_migrations

    try:
        pending = pending_migrations(conn)
    except MigrationError as exc:
        raise ConfigError(str(exc)) from None
    if pending:
        raise ConfigError(f"schema {postgres.schema} lacks migrations {', '.join(pending)}: run `fraudd migrate` first")


def check_shard_count(redis_settings: RedisSettings, stream: str, shards: int, group: str) -> None:
    """Refuse a --shards that leaves entries on streams only another count reads; otherwise record it
    (the scoring's start-up)."""
    from . import shard_counts
    from .runtime.redis_clients import redis_client

    client = redis_client(redis_settings.url, redis_settings.cluster, decode_responses=True)
    try:
        left = shard_counts.stranded(client, stream, shards, group)
        if not left:
            shard_counts.record(client, stream, shards, int(time.time() * 1000))
    finally:
        client.close()
    if left:
        raise ConfigError(shard_counts.describe(left, shards))


def check_producer_shard_count(redis_settings: RedisSettings, stream: str, shards: int) -> None:
    """Refuse a --shards other than the one scoring last ran with: its streams would have no reader.
    A Redis that does not answer yet is let be, as in ``check_eviction`` (the ingest's start-up)."""
    from . import shard_counts
    from .runtime.redis_clients import REDIS_FAILURES, redis_client

    try:
        client = redis_client(redis_settings.url, redis_settings.cluster, socket_timeout=3, socket_connect_timeout=3)
        try:
            scored_with = shard_counts.latest(client, stream)
        finally:
            client.close()
    except REDIS_FAILURES:
        return
    if scored_with is not None and scored_with != shards:
        raise ConfigError(
            f"--shards {shards}: fraudd run scores {stream} with --shards {scored_with}, so nobody would "
            f"read what this ingest writes; use --shards {scored_with} (README: Changing the shard count)"
        )


def check_eviction(redis_settings: RedisSettings) -> None:
    """Refuse a Redis whose maxmemory-policy can evict fraudd's keys. One that does not answer yet is
    let be: the ingest starts anyway and answers 503 until Redis is back."""
    from .runtime.probes import redis_memory
    from .runtime.redis_clients import REDIS_FAILURES, redis_client

    try:
        client = redis_client(redis_settings.url, redis_settings.cluster, socket_timeout=3, socket_connect_timeout=3)
        try:
            eviction = redis_memory(client).eviction_problem()
        finally:
            client.close()
    except REDIS_FAILURES:
        return
    if eviction:
        raise ConfigError(f"--redis-url / REDIS_URL: {eviction}")


def connect_postgres(postgres: PostgresSettings) -> psycopg.Connection:
    """An autocommit connection to ``postgres``, or a ``ConfigError`` naming --postgres-url."""
    from .schema import connect

    try:
        return connect(postgres.url, postgres.schema, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"--postgres-url / POSTGRES_URL: cannot connect to {redact(postgres.url)}: {reason}") from None


def redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
