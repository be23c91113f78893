"""Dedicated Redis and PostgreSQL servers that a test may stop, kill and restart.

The machine's shared Redis and PostgreSQL must never be stopped, so tests that take a dependency
away run their own (``fraudd.localservers``): a ``redis-server`` with an append-only file fsynced
on every write, and a PostgreSQL cluster initialised in a temporary directory, each on a free port
of its own. Both are removed with their directories afterwards. ``DaemonProcess`` runs ``fraudd run`` with its log in a
file, because a long chaos run writes more log than a pipe nobody reads can hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fraudd import localservers
from fraudd.localservers import RedisServer, free_port, scratch_dir

from .conftest import Namespace, migrate, running, wait_for
from .streams import fully_drained

__all__ = ["RedisServer", "free_port"]


class PostgresServer(localservers.PostgresServer):
    def set_read_only(self, read_only: bool) -> None:
        """Make every transaction read-only (as a hot standby or a full-disk guard would), live."""
        self.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}")
        self.execute("SELECT pg_reload_conf()")


def _scratch_redis(persistent: bool) -> Iterator[RedisServer]:
    yield from running(RedisServer(scratch_dir("fraudd-redis-"), persistent=persistent))


@pytest.fixture
def dedicated_redis() -> Iterator[RedisServer]:
    """A persistent redis-server of this test's own, killed and removed afterwards."""
    yield from _scratch_redis(persistent=True)


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A redis-server without persistence: a restart loses every key, Functions included."""
    yield from _scratch_redis(persistent=False)


# What a production cluster sets to use TimescaleDB (telemetry off: tests phone nobody).
TIMESCALEDB = {"shared_preload_libraries": "timescaledb", "timescaledb.telemetry_level": "off"}


def scratch_postgres(settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started PostgreSQL cluster with these server settings, removed afterwards."""
    server = PostgresServer(scratch_dir("fraudd-pg-"), settings=dict(settings or {}))
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def dedicated_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the module's tests; a test that stops it must start it again."""
    yield from scratch_postgres()


@pytest.fixture(scope="module")
def timescaledb_postgres() -> Iterator[PostgresServer]:
    """A cluster that loads TimescaleDB, as a production one using it does; ``.ci/setup`` installs it."""
    if not (localservers.PG_BIN.parent / "lib" / "timescaledb.so").exists():
        pytest.fail("TimescaleDB is not installed next to PostgreSQL 15: run .ci/setup")
    yield from scratch_postgres(TIMESCALEDB)


def dedicated_namespace(redis_server: RedisServer, postgres_url: str) -> Namespace:
    """A migrated namespace on the given servers (nothing to drop: the servers are scratch)."""
    namespace = Namespace(f"t{uuid.uuid4().hex[:10]}", redis_url=redis_server.url, postgres_url=postgres_url)
    migrate(namespace)
    return namespace


@dataclass
class DaemonProcess:
    """``fraudd run`` in its own session with stderr in ``log_path``; always killed on cleanup."""

    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, ns: Namespace, log_path: Path, *args: str, **env: str) -> DaemonProcess:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [ns.executable, "run", *args], env=ns.env(**env), stdout=log, stderr=log, start_new_session=True
            )
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful: workers settle their batch) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill_group(self) -> None:
        """SIGKILL the supervisor and every process of its session (cleanup after a failure)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(ns: Namespace, tmp_path: Path, *args: str) -> DaemonProcess:
    """``fraudd run`` with its log in ``tmp_path``; stop it with ``stop``."""
    return DaemonProcess.start(ns, tmp_path / "fraudd.log", *args)


def drain(client: redis.Redis, ns: Namespace, tmp_path: Path, *args: str, timeout: float = 120) -> str:
    """Run the daemon until the stream is fully drained, stop it cleanly, return its log."""
    daemon = start(ns, tmp_path, *args)
    try:
        wait_for(lambda: fully_drained(client, ns), timeout, message="the stream to be drained")
    finally:
        log = stop(daemon)
    return log


def stop(daemon: DaemonProcess) -> str:
    """Stop gracefully, assert a clean exit, return the log."""
    try:
        code = daemon.stop()
    finally:
        daemon.kill_group()
    log = daemon.log()
    assert code == 0, log[-3000:]
    crashes = [line for line in log.splitlines() if '"worker_crashed"' in line]
    assert not crashes, "\n".join(crashes)  # each line carries its traceback
    return log
