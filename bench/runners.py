"""Starting the consumers under test and timing how fast they drain a stream.

``fraudd run`` is started as a real subprocess, exactly as an operator would; the baselines are
``python -m bench.baselines`` processes, as many as fraudd has workers. The drain rate is read
from the consumer group itself (entries delivered minus entries still pending = acked), so every
consumer is timed by the same yardstick and none has to report anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from bench import procstat
from bench.namespace import FRAUDD, Namespace
from bench.usage import Probe, Snapshot, Usage, usage

POLL_S = 0.01


@dataclass(frozen=True)
class Setup:
    """Where to run and with what: shared by every measurement of one invocation."""

    client: redis.Redis | RedisCluster
    redis_url: str  # with a cluster: every node, comma-separated
    postgres_url: str
    fraudd_args: list[str]
    workers: int
    batch_size: int
    model_path: str
    services: dict
    out_dir: Path
    log_dir: Path
    echo: Callable[[str], None]
    shards: int = 1
    cluster: bool = False


class ConsumerFailed(RuntimeError):
    """A consumer process exited or stopped making progress during a measurement."""


@dataclass(frozen=True, slots=True)
class GroupState:
    entries_read: int
    pending: int
    lag: int
    consumers: int

    @property
    def acked(self) -> int:
        return self.entries_read - self.pending


def group_state(client: redis.Redis, ns: Namespace) -> GroupState:
    """The group over the namespace's input (summed over its shards; consumers: distinct names).

    One round trip for every shard: the latency and soak runs poll this every few milliseconds, on
    the cores they measure.
    """
    sharded = ns.shards > 1
    pipe = client.pipeline(transaction=False)
    for stream in ns.streams:
        pipe.xinfo_groups(stream)
        if sharded:
            # A worker joins the groups of the shards it owns only.
            pipe.xinfo_consumers(stream, ns.group)
    replies = pipe.execute()
    read = pending = lag = 0
    names: set[str] = set()
    for index, stream in enumerate(ns.streams):
        groups = replies[index * 2 if sharded else index]
        group = next((g for g in groups if g["name"] == ns.group), None)
        if group is None:
            raise ConsumerFailed(f"consumer group {ns.group} missing on {stream}")
        read += group["entries-read"] or 0
        shard_lag = group["lag"]
        if shard_lag is None:
            # Redis cannot tell after deletions inside the unread range; count it instead.
            shard_lag = int(client.xinfo_stream(stream)["entries-added"]) - (group["entries-read"] or 0)
        pending += int(group["pending"])
        lag += int(shard_lag)
        if not sharded:
            return GroupState(read, pending, lag, int(group["consumers"]))
        names.update(c["name"] for c in replies[index * 2 + 1])
    return GroupState(read, pending, lag, len(names))


class Consumers:
    """Processes consuming the namespace's stream; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, label: str, commands: list[list[str]], ns: Namespace, log_path: Path, supervised: bool, count: int
    ) -> None:
        self.label = label
        self.supervised = supervised
        self.count = count  # consumers in the group once all are up (fraudd: its workers)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # Own sessions, so a stuck tree can always be killed as a whole by its group id.
        self.processes = [
            subprocess.Popen(command, env=ns.env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
            for command in commands
        ]

    @classmethod
    def fraudd(cls, ns: Namespace, args: list[str], workers: int, log_path: Path) -> Consumers:
        return cls("fraudd", [[*FRAUDD, "run", *args]], ns, log_path, supervised=True, count=workers)

    @classmethod
    def baseline(
        cls, kind: str, ns: Namespace, processes: int, batch_size: int, log_path: Path, model_path: str | None = None
    ) -> Consumers:
        commands = []
        for i in range(processes):
            command = [
                sys.executable,
                "-m",
                "bench.baselines",
                kind,
                "--consumer",
                f"{ns.consumer_id}-{i}",
                "--batch-size",
                str(batch_size),
            ]
            if model_path:
                command += ["--model-path", model_path]
            commands.append(command)
        return cls(kind, commands, ns, log_path, supervised=False, count=processes)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def worker_pids(self) -> list[int]:
        """The processes that consume: fraudd's workers (the supervisor's children), or all."""
        if not self.supervised:
            return self.pids
        return [p.pid for p in procstat.tree(self.pids, procstat.all_processes()) if p.pid not in self.pids]

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise ConsumerFailed(f"{self.label} exited with {process.returncode}; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def wait_ready(self, client: redis.Redis, ns: Namespace, timeout: float = 60.0) -> None:
        """Until every consumer has joined the group (made its first read)."""
        deadline = time.monotonic() + timeout
        while group_state(client, ns).consumers < self.count:
            self.check_alive()
            if time.monotonic() > deadline:
                raise ConsumerFailed(f"{self.label}: consumers not up after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM (fraudd settles its batch and exits); SIGKILL of the whole group after ``timeout``."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._log.close()
        return [p.returncode for p in self.processes]


def start_producer(ns: Namespace, rate: float, seconds: float, seed: int, record: Path) -> tuple[subprocess.Popen, float]:
    """Start ``bench.producer`` on the namespace's stream; returns it and its clock's start (epoch s)."""
    producer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.producer",
            "--redis-url",
            ns.redis_url,
            "--stream",
            ns.stream,
            "--rate",
            repr(rate),
            "--seconds",
            repr(seconds),
            "--seed",
            str(seed),
            "--shards",
            str(ns.shards),
            "--out",
            str(record),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ns.env(),
    )
    line = producer.stdout.readline()
    if not line.startswith("started "):
        producer.wait(10)
        raise ConsumerFailed(f"producer failed to start (exit {producer.returncode})")
    return producer, float(line.split()[1])


def tear_down(
    client: redis.Redis, ns: Namespace, producer: subprocess.Popen | None, consumers: Consumers | None, record_path: Path
) -> None:
    """Stop whatever a paced run started and remove its namespace, however far it got."""
    if producer is not None and producer.poll() is None:
        producer.terminate()
        producer.wait(10)
    if consumers is not None:
        consumers.stop(timeout=10)
    record_path.unlink(missing_ok=True)
    ns.drop(client)


def wait_drained(
    client: redis.Redis,
    ns: Namespace,
    consumers: Consumers,
    expected: int,
    stall_timeout: float = 60.0,
    on_poll: Callable[[GroupState], float | None] | None = None,
) -> GroupState:
    """Poll until all ``expected`` entries are acked; fail if progress stops or a consumer dies.

    ``on_poll`` sees every state and may return the pause before the next poll.
    """
    progress_at, last_acked = time.monotonic(), -1
    while True:
        state = group_state(client, ns)
        pause = on_poll(state) if on_poll is not None else None
        if state.lag == 0 and state.pending == 0 and state.acked >= expected:
            return state
        now = time.monotonic()
        if state.acked != last_acked:
            progress_at, last_acked = now, state.acked
        elif now - progress_at > stall_timeout:
            raise ConsumerFailed(
                f"{consumers.label}: no progress for {stall_timeout:.0f}s at {state}; "
                f"log {consumers.log_path}:\n{consumers.log_tail()}"
            )
        consumers.check_alive()
        time.sleep(POLL_S if pause is None else pause)


@dataclass(frozen=True, slots=True)
class Drain:
    """A prefilled stream drained: the rate over the window from the first ack to the last."""

    label: str
    namespace: str
    processes: int
    transactions: int
    rate: float
    usage: Usage

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "namespace": self.namespace,
            "processes": self.processes,
            "transactions": self.transactions,
            "rate_tx_per_s": round(self.rate, 1),
            **self.usage.as_dict(),
        }


def measure_drain(client: redis.Redis, ns: Namespace, consumers: Consumers, expected: int, stall_timeout: float = 60.0) -> Drain:
    """Time ``consumers`` draining ``expected`` prefilled entries, CPU included.

    The window opens at the first poll that sees an ack with every consumer up (start-up, model
    loading and connecting stay out of it) and closes at the first poll that sees the stream
    drained. Until it opens the group is polled every millisecond, then every ``POLL_S``: a
    fraction of a percent of any window worth reporting. A drain so short that it is over before
    every consumer joined (smoke runs) is timed from the first ack instead.
    """
    probe = Probe(client, ns.postgres_url, consumers.pids, consumers.supervised)
    openings: dict[str, tuple[float, int, Snapshot]] = {}

    def open_window(state: GroupState) -> float:
        if "all_up" not in openings and state.acked > 0:
            opening = (time.monotonic(), state.acked, probe.snapshot())
            openings.setdefault("first_ack", opening)
            if state.consumers >= consumers.count:
                openings["all_up"] = opening
        return POLL_S if "all_up" in openings else 0.001

    state = wait_drained(client, ns, consumers, expected, stall_timeout, open_window)
    at, acked, first = openings.get("all_up", openings["first_ack"])
    if state.acked == acked:
        at, acked, first = openings["first_ack"]
    seconds = time.monotonic() - at
    last = probe.snapshot()
    moved = state.acked - acked
    return Drain(
        consumers.label,
        ns.name,
        consumers.count,
        moved,
        moved / seconds if seconds > 0 else 0.0,
        usage(first, last, moved, seconds),
    )
