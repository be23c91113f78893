"""Private Redis and PostgreSQL servers for one benchmark invocation (``--private-services``).

On a shared machine other people's work runs on the shared servers too, and neither Redis's CPU
counters and commandstats nor PostgreSQL's processes can tell whose work it was. A private pair,
configured like the shared one (the settings that move performance are copied from it), puts
only this run's work on them. The private PostgreSQL also turns on ``track_commit_timestamp``,
which gives every row's exact commit time (``bench latency``) and cannot be switched on in the
shared server without a restart. Both are removed with their directories afterwards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SETTINGS = ("appendonly", "appendfsync", "save", "hz", "io-threads")
PG_SETTINGS = ("shared_buffers", "fsync", "synchronous_commit", "full_page_writes", "wal_level", "max_wal_size",
               "min_wal_size", "checkpoint_timeout", "wal_buffers", "work_mem", "autovacuum", "max_connections",
               "TimeZone")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _as_postgres(*command: str) -> None:
    # initdb refuses to run as root
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextmanager
def private(shared_redis_url: str, shared_postgres_url: str, echo) -> Iterator[tuple[str, str, dict]]:
    """(redis URL, PostgreSQL URL, settings used) of a fresh private pair, torn down on exit."""
    shared = redis.Redis.from_url(shared_redis_url, decode_responses=True)
    redis_settings = {name: shared.config_get(name).get(name) for name in REDIS_SETTINGS}
    with psycopg.connect(shared_postgres_url, autocommit=True) as conn:
        pg_settings = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in PG_SETTINGS}
    pg_settings["track_commit_timestamp"] = "on"
    directory = Path(tempfile.mkdtemp(prefix="fraudd-bench-"))
    directory.chmod(0o755)
    redis_port, pg_port = _free_port(), _free_port()
    redis_server = None
    data = directory / "pg"
    try:
        args = [x for name, value in redis_settings.items() if value is not None for x in (f"--{name}", value)]
        redis_server = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(directory), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        client = redis.Redis.from_url(redis_url)
        _wait(lambda: _pings(client, redis_server), f"redis-server on port {redis_port}")
        shutil.chown(directory, "postgres", "postgres")
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                     "-E", "UTF8", "--locale", "C")
        options = f"-p {pg_port} -c listen_addresses=127.0.0.1 -k {directory} " + " ".join(
            f"-c {name}={value}" for name, value in pg_settings.items())
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(directory / "postgres.log"), "-o", options,
                     "-w", "-t", "60", "start")
        echo(f"private services: redis :{redis_port}, postgresql :{pg_port} ({directory})")
        yield redis_url, f"postgresql://postgres@127.0.0.1:{pg_port}/postgres", {"redis": redis_settings,
                                                                                  "postgresql": pg_settings}
    finally:
        if (data / "postmaster.pid").exists():
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


def _pings(client: redis.Redis, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"private redis-server exited with {process.returncode}")
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
