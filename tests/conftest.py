"""Fixtures on the machine's real Redis and PostgreSQL.

Each test gets its own namespace: a PostgreSQL schema and stream names (hence Redis key tags) of
its own, removed afterwards, so tests never see each other's data and never flush anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from click.testing import CliRunner, Result
from redis.cluster import RedisCluster

import fraudd.namespace
from bench.redis_cluster import RedisClusterServers
from fraudd import schema
from fraudd.localservers import RedisServer, scratch_dir
from fraudd.runtime import redis_clients

_Servers = TypeVar("_Servers", RedisServer, RedisClusterServers)

# The private servers' fixtures (a test that stops, kills or restarts a server): registered here,
# so a test asks for them by parameter name, with no import its parameter would shadow.
pytest_plugins = ["tests.services"]

REDIS_URL = os.environ.get("FRAUDD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("FRAUDD_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
FRAUDD = str(Path(sys.executable).with_name("fraudd"))


@dataclass
class Namespace(fraudd.namespace.Namespace):
    """One test's streams, group and schema, and the ways a test drives ``fraudd`` in them."""

    redis_url: str = REDIS_URL
    postgres_url: str = POSTGRES_URL
    extra_env: dict[str, str] = field(default_factory=dict)
    # The ``fraudd`` command: the checkout's, or one installed elsewhere (the wheel test's).
    executable: str = FRAUDD

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.environment(), FRAUDD_BLOCK_MS="20", FRAUDD_SHUTDOWN_TIMEOUT_S="20")
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def fraudd(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.executable, *args], env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def fraudd_in_process(self, *args: str) -> Result:
        """``fraudd <args>`` run by this process, in the namespace's environment: for a command a test
        repeats as plumbing (starting the executable costs 0.6 s a time); what a test checks of a
        command's own behaviour goes through ``fraudd`` above."""
        from fraudd import cli

        return CliRunner().invoke(cli.main, list(args), env=self.env(), catch_exceptions=False)

    def start(self, *args: str, **env: str) -> Daemon:
        return self.start_command("run", *args, **env)

    def start_command(self, command: str, *args: str, **env: str) -> Daemon:
        """A long-running ``fraudd <command>`` (run, labels, …) in this namespace."""
        process = subprocess.Popen(
            [self.executable, command, *args],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return Daemon(process)


@dataclass
class Daemon:
    """A ``fraudd run`` subprocess (its own process group, so a test can always clean it up)."""

    process: subprocess.Popen

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM, wait, and return (exit code, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr

    def stop_when_exited(self, timeout: float) -> tuple[int, str]:
        """Wait for the daemon to exit by itself and return (exit code, stderr)."""
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate(timeout=30)


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    try:
        return [int(pid) for pid in children.read_text().split()]
    except FileNotFoundError:
        return []


def kill_workers_until(done, supervisor_pid: int, seconds: float, rng, every_s: tuple[float, float] = (0.5, 1.5)) -> int:
    """SIGKILL a random worker of ``supervisor_pid`` every ``every_s`` (a uniform range) for ``seconds``
    or until ``done()``; returns how many were killed."""
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        time.sleep(rng.uniform(*every_s))
        if done():
            # A worker killed now would die during the stop that follows, which logs no worker_died.
            break
        pids = worker_pids(supervisor_pid)
        if pids:
            os.kill(int(rng.choice(pids)), signal.SIGKILL)
            kills += 1
    return kills


def wait_for(condition, timeout: float, interval: float = 0.1, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    yield client
    client.close()


# ``fraudd migrate``'s TimescaleDB policies, as the command reads them from its environment.
_MIGRATE_POLICIES = {"FRAUDD_COMPRESS_AFTER_DAYS": "compress_after_days", "FRAUDD_RETENTION_DAYS": "retention_days"}


def migrate(namespace: Namespace) -> None:
    """What ``fraudd migrate`` does in the namespace's environment, done in this process: 0.1 s where
    starting the command takes 0.6 s, for each of the hundred-odd namespaces the suite migrates.
    The command itself is run by test_pipeline's migrate test, test_timescaledb and test_package."""
    env = namespace.env()
    policies = {param: int(env[variable]) for variable, param in _MIGRATE_POLICIES.items() if variable in env}
    with schema.connect(namespace.postgres_url, namespace.schema, connect_timeout=5) as conn:
        schema.migrate(conn, namespace.schema, **policies)


def migrated_namespace(redis_client: redis.Redis, **servers: str) -> Iterator[Namespace]:
    """A fresh namespace migrated as by ``fraudd migrate`` (on other servers if given), dropped afterwards."""
    namespace = Namespace(f"t{uuid.uuid4().hex[:10]}", **servers)
    migrate(namespace)
    yield namespace
    namespace.drop(redis_client)


@pytest.fixture
def ns(redis_client: redis.Redis) -> Iterator[Namespace]:
    """A fresh, migrated namespace, dropped after the test."""
    yield from migrated_namespace(redis_client)


def running(servers: _Servers) -> Iterator[_Servers]:
    """``servers`` (a ``RedisServer`` or ``RedisClusterServers``) started, then killed and their
    directory removed."""
    try:
        servers.start()
        yield servers
    finally:
        servers.kill()
        shutil.rmtree(servers.directory, ignore_errors=True)


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of 3 masters and 3 replicas of the test's own (2-3 s to start), killed and
    removed afterwards: a test may fail a master over or move slots."""
    yield from running(RedisClusterServers(scratch_dir("fraudd-cluster-")))


@pytest.fixture
def cluster_client(redis_cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    client = redis_clients.redis_client(redis_cluster.url, cluster=True)
    yield client
    client.close()


@pytest.fixture
def cluster_ns(redis_client: redis.Redis, redis_cluster: RedisClusterServers) -> Iterator[Namespace]:
    """A fresh namespace whose ``fraudd`` commands use the cluster (``REDIS_CLUSTER``); the schema is dropped afterwards."""
    for namespace in migrated_namespace(redis_client, redis_url=redis_cluster.url):
        namespace.extra_env["REDIS_CLUSTER"] = "1"
        yield namespace
