"""The ``fraudd`` command line."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click
import psycopg
import redis

from . import logs
from .config import ConfigError, Settings, settings_from, settings_options


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """fraudd: real-time fraud scoring of a Redis Stream into PostgreSQL."""


@main.command()
@settings_options
def run(**params) -> None:
    """Score the input stream with a supervisor and --workers worker processes."""
    settings = settings_from(params)
    logs.setup(settings.log_level)
    if settings.metrics_port:
        _prepare_metrics_dir()
    preflight(settings)
    from .supervisor import Supervisor  # imports prometheus-client, which reads the directory above

    sys.exit(Supervisor(settings).run())


@main.command()
@settings_options
def migrate(**params) -> None:
    """Apply pending schema migrations and create the coming days' partitions (idempotent)."""
    from .schema import migrate as apply

    settings = settings_from(params)
    logs.setup(settings.log_level)
    with _connect_postgres(settings) as conn:
        applied = apply(conn, settings.pg_schema)
    click.echo(f"schema {settings.pg_schema}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))


def preflight(settings: Settings) -> None:
    """Check every dependency before forking, so a bad setting is one clear line, not a crash loop."""
    from .features import FEATURE_NAMES
    from .model import FraudModel, ModelError
    from .rules import Rules, RulesError
    from .schema import pending_migrations
    from .worker import connect_redis, ensure_group

    try:
        FraudModel.load(settings.model_path, FEATURE_NAMES)
    except ModelError as exc:
        raise ConfigError(f"--model-path / ML_MODEL_PATH: {exc}") from None
    try:
        Rules.load(settings.rules_path)
    except RulesError as exc:
        raise ConfigError(f"--rules-path: {exc}") from None
    client = connect_redis(settings.redis_url)
    try:
        client.ping()
        ensure_group(client, settings.stream, settings.group)
    except redis.RedisError as exc:
        raise ConfigError(f"--redis-url / REDIS_URL: cannot use {_redact(settings.redis_url)}: {exc}") from None
    finally:
        client.close()
    with _connect_postgres(settings) as conn:
        pending = pending_migrations(conn)
    if pending:
        raise ConfigError(f"schema {settings.pg_schema} lacks migrations {', '.join(pending)}: run `fraudd migrate` first")


def _connect_postgres(settings: Settings) -> psycopg.Connection:
    try:
        conn = psycopg.connect(settings.postgres_url, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"--postgres-url / POSTGRES_URL: cannot connect to {_redact(settings.postgres_url)}: {reason}") from None
    conn.execute(f'SET search_path TO "{settings.pg_schema}"')
    return conn


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def _prepare_metrics_dir() -> None:
    """Give prometheus-client an empty multiprocess directory before anything imports it.

    It picks its storage at import time, and every forked worker then writes its own files there
    for the supervisor's ``/metrics`` to sum. Without ``--metrics-port`` nothing is exported and
    the metrics stay in process memory.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="fraudd-metrics-"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    atexit.register(shutil.rmtree, directory, True)
