"""Dedicated Redis and PostgreSQL servers that a test may stop, kill and restart.

The machine's shared Redis and PostgreSQL must never be stopped, so tests that take a dependency
away run their own: a ``redis-server`` with an append-only file fsynced on every write, and a
PostgreSQL cluster initialised in a temporary directory, each on a free port of its own. Both are
removed with their directories afterwards. ``DaemonProcess`` runs ``fraudd run`` with its log in a
file, because a long chaos run writes more log than a pipe nobody reads can hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

from .conftest import FRAUDD, Namespace, wait_for
from .streams import fully_drained

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    """A ``redis-server`` of the test's own; ``persistent`` keeps data across kills (AOF, fsync always)."""

    directory: Path
    persistent: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, protocol=2, socket_timeout=10)

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", *persistence, "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_until(self._ready, _START_TIMEOUT_S, f"redis-server on port {self.port}")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: see {self.directory}/redis.log")
        try:
            with self.client() as client:
                return client.ping()
        except redis.RedisError:  # refused, or still loading the append-only file
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does. Acknowledged writes survive when persistent."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


@dataclass
class PostgresServer:
    """A PostgreSQL 15 cluster in ``directory``, run by the ``postgres`` user (initdb refuses root)."""

    directory: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str, timeout: float = 120) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8", "--locale", "C")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
                   "-c max_connections=60 -c shared_buffers=64MB")
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "postgres.log"),
                          "-o", options, "-w", "-t", str(int(_START_TIMEOUT_S)), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash: uncommitted work is gone, committed work recovered."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def execute(self, query: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(query)

    def set_read_only(self, read_only: bool) -> None:
        """Make every transaction read-only (as a hot standby or a full-disk guard would), live."""
        self.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}")
        self.execute("SELECT pg_reload_conf()")


def _scratch_dir(prefix: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def _scratch_redis(persistent: bool) -> Iterator[RedisServer]:
    server = RedisServer(_scratch_dir("fraudd-redis-"), persistent=persistent)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def dedicated_redis() -> Iterator[RedisServer]:
    """A persistent redis-server of this test's own, killed and removed afterwards."""
    yield from _scratch_redis(persistent=True)


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A redis-server without persistence: a restart loses every key, Functions included."""
    yield from _scratch_redis(persistent=False)


@pytest.fixture(scope="module")
def dedicated_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the module's tests; a test that stops it must start it again."""
    server = PostgresServer(_scratch_dir("fraudd-pg-"))
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.directory, ignore_errors=True)


def dedicated_namespace(redis_server: RedisServer, postgres_url: str) -> Namespace:
    """A migrated namespace on the given servers (nothing to drop: the servers are scratch)."""
    namespace = Namespace(f"t{uuid.uuid4().hex[:10]}", redis_url=redis_server.url, postgres_url=postgres_url)
    result = namespace.fraudd("migrate")
    assert result.returncode == 0, result.stderr
    return namespace


@dataclass
class DaemonProcess:
    """``fraudd run`` in its own session with stderr in ``log_path``; always killed on cleanup."""

    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, ns: Namespace, log_path: Path, *args: str, **env: str) -> DaemonProcess:
        with open(log_path, "ab") as log:
            process = subprocess.Popen([FRAUDD, "run", *args], env=ns.env(**env), stdout=log, stderr=log,
                                       start_new_session=True)
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
    assert '"worker_crashed"' not in log, log[-3000:]
    return log
