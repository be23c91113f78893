"""Throwaway Redis and PostgreSQL servers on free ports, in a directory of their own.

Each also listens on a Unix domain socket in its directory (``socket_url``), so that fraudd's
support for socket URLs is tested against real servers.

The demo starts them when the configured servers are not reachable, the benchmark to keep its
measurements free of other people's work, and the tests to stop, kill and restart a dependency
without touching the machine's shared servers. Each runs from the binaries Debian installs
(packages ``redis-server`` and ``postgresql``) and goes away with its directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S = 60.0


class MissingServer(RuntimeError):
    """A server's binaries are not installed; the message names the Debian package."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory every user may enter (PostgreSQL runs as ``postgres`` under root)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RedisServer:
    """A ``redis-server`` in ``directory``; ``persistent`` keeps data across kills (AOF, fsync always).

    ``config`` holds further ``redis-server`` options by name (``{"maxmemory": "40mb"}``).
    """

    directory: Path
    persistent: bool = True
    config: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def socket_url(self) -> str:
        """The same server through its Unix socket (redis-py's ``UnixDomainSocketConnection``)."""
        return f"unix://{self.socket}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, protocol=2, socket_timeout=10)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise MissingServer("redis-server is not installed (Debian package: redis-server)")
        persistence = {"appendonly": "yes", "appendfsync": "always"} if self.persistent else {"appendonly": "no"}
        options = {"save": "", **persistence, **self.config}
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *[arg for name, value in options.items() for arg in (f"--{name}", value)],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._ready, START_TIMEOUT_S, f"redis-server on port {self.port}")

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
    """A PostgreSQL 15 cluster in ``directory`` with trust authentication for ``postgres``.

    ``settings`` are server parameters set at start (``{"shared_preload_libraries": "timescaledb"}``).
    Under root the cluster is run by the ``postgres`` user: initdb refuses root.
    """

    directory: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        """The same server through its Unix socket: libpq takes a directory as the host, and the
        port names the socket file in it (``.s.PGSQL.<port>``)."""
        return f"postgresql://postgres@/postgres?host={self.directory}&port={self.port}"

    def _run(self, program: str, *args: str, timeout: float = 120) -> None:
        binary = PG_BIN / program
        if not binary.exists():
            raise MissingServer(f"{binary} is not installed (Debian package: postgresql-15)")
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*as_postgres, str(binary), *args], check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale", "C")

    def start(self) -> None:
        settings = {"listen_addresses": "127.0.0.1", "max_connections": "60", "shared_buffers": "64MB", **self.settings}
        options = f"-p {self.port} -k {self.directory} " + " ".join(f"-c {k}={v}" for k, v in settings.items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(int(START_TIMEOUT_S)),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash: uncommitted work is gone, committed work recovered."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def execute(self, query: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(query)
