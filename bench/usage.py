"""Who spent how much CPU over a measured window, per transaction.

A ``Probe`` snapshots the CPU of every component at the window's two ends: the consumer processes
(fraudd's supervisor and workers, or a baseline's processes), Redis, the PostgreSQL server's processes,
the open-loop producer when there is one, and this benchmark process itself. Redis is also read
through INFO: its own CPU counters and ``commandstats``, which say which commands the time went to.
On a Redis Cluster every node (replicas included) is measured apart, and ``redis`` is their sum.
The whole machine's busy time is taken too; what no component accounts for is "other" load (other
people's work on a shared box), reported so a noisy run can be recognised as such.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psycopg
import redis
from redis.cluster import RedisCluster

from bench import procstat


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One Redis server: the CPU of its process (None when it is not on this machine) and what INFO says."""

    cpu_s: float | None
    info_cpu_s: float
    commands: dict[str, tuple[int, int]]  # name -> (calls, usec)

    @property
    def best_cpu_s(self) -> float:
        """The kernel's figure where there is one (it includes threads INFO leaves out), else INFO's."""
        return self.info_cpu_s if self.cpu_s is None else self.cpu_s


@dataclass(frozen=True, slots=True)
class Snapshot:
    wall: float
    cpu_s: dict[str, float]
    machine_busy_s: float
    redis_nodes: dict[str, NodeSnapshot]  # "host:port" -> its figures


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU over one window, as totals and per transaction (µs)."""

    transactions: int
    seconds: float
    cpu_s: dict[str, float]
    cpu_us_per_tx: dict[str, float]
    pipeline_cpu_us_per_tx: float
    machine_busy_s: float
    other_cpu_s: float
    redis_info_cpu_us_per_tx: float
    redis_commands: dict[str, dict[str, float]]
    redis_nodes: dict[str, dict]

    def as_dict(self) -> dict:
        return {
            "transactions": self.transactions,
            "seconds": round(self.seconds, 4),
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
            "cpu_us_per_tx": {k: round(v, 2) for k, v in self.cpu_us_per_tx.items()},
            "pipeline_cpu_us_per_tx": round(self.pipeline_cpu_us_per_tx, 2),
            "machine_busy_s": round(self.machine_busy_s, 3),
            "machine_utilisation": round(self.machine_busy_s / (self.seconds * (os.cpu_count() or 1)), 3)
            if self.seconds > 0
            else 0.0,
            "other_cpu_s": round(self.other_cpu_s, 3),
            "redis_info_cpu_us_per_tx": round(self.redis_info_cpu_us_per_tx, 2),
            "redis_commands": self.redis_commands,
            "redis_nodes": self.redis_nodes,
        }


# Components whose CPU is the cost of scoring (the producer and the benchmark itself are not).
PIPELINE = ("supervisor", "workers", "consumers", "redis", "postgres")


class Probe:
    """Snapshots the CPU of a run's components.

    ``supervised``: the consumer root is fraudd's supervisor, whose own time is reported apart
    from its workers' (the workers' time includes those the supervisor reaped).
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        postgres_url: str,
        consumer_roots: list[int],
        supervised: bool,
        producer: int | None = None,
    ) -> None:
        self._nodes = redis_nodes(client)
        self._postmaster = postmaster_pid(postgres_url)
        self._roots = consumer_roots
        self._supervised = supervised
        self._producer = producer
        self._redis_pids = {}
        for name, node in self._nodes.items():
            pid = int(node.info("server")["process_id"])
            proc = procstat.read(pid)
            # A Redis on another host (or in a container) is measured through INFO only.
            self._redis_pids[name] = pid if proc is not None and proc.comm.startswith("redis") else None

    def snapshot(self) -> Snapshot:
        procs = procstat.all_processes()
        cpu: dict[str, float] = {}
        consumers = procstat.tree(self._roots, procs)
        if self._supervised:
            own = sum(p.cpu_s for p in consumers if p.pid in self._roots)
            cpu["supervisor"] = own
            cpu["workers"] = procstat.total_cpu_s(consumers) - own
        else:
            cpu["consumers"] = procstat.total_cpu_s(consumers)
        nodes = {name: self._node_snapshot(name, procs) for name in self._nodes}
        cpu["redis"] = sum(node.best_cpu_s for node in nodes.values())
        # The server's own process tree: other clusters on the box (tests start private ones) stay out.
        if self._postmaster is not None:
            cpu["postgres"] = procstat.total_cpu_s(procstat.tree([self._postmaster], procs))
        if self._producer is not None:
            cpu["producer"] = procstat.total_cpu_s(procstat.tree([self._producer], procs))
        times = os.times()
        cpu["bench"] = times.user + times.system
        return Snapshot(wall=time.time(), cpu_s=cpu, machine_busy_s=procstat.machine_busy_s(), redis_nodes=nodes)

    def _node_snapshot(self, name: str, procs: list[procstat.Proc]) -> NodeSnapshot:
        info = self._nodes[name].info("everything")
        pid = self._redis_pids[name]
        return NodeSnapshot(
            cpu_s=None if pid is None else procstat.total_cpu_s(p for p in procs if p.pid == pid),
            info_cpu_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            commands={
                key.removeprefix("cmdstat_"): (int(value["calls"]), int(value["usec"]))
                for key, value in info.items()
                if key.startswith("cmdstat_")
            },
        )


def redis_nodes(client: redis.Redis | RedisCluster) -> dict[str, redis.Redis]:
    """Every server behind ``client`` by ``host:port`` (a socket's path): the one Redis, or each
    node of a cluster, masters in slot order, then replicas."""
    if not isinstance(client, RedisCluster):
        kwargs = client.connection_pool.connection_kwargs
        if "path" in kwargs:  # a unix:// URL
            return {kwargs["path"]: client}
        return {f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}": client}
    # CLUSTER NODES rather than the client's slot map: Redis leaves a replica out of CLUSTER SLOTS
    # until it has replicated something.
    described = client.cluster_nodes()
    order = sorted(
        described,
        key=lambda address: (
            "master" not in described[address]["flags"],
            int(described[address]["slots"][0][0]) if described[address]["slots"] else 0,
        ),
    )
    nodes = {}
    for address in order:
        host, port = address.rsplit(":", 1)
        # A cluster of one node never learnt its own address: it is the seed's.
        host = host or client.get_default_node().host
        nodes[f"{host}:{port}"] = redis.Redis(host=host, port=int(port), protocol=2, decode_responses=True)
    return nodes


def postmaster_pid(postgres_url: str) -> int | None:
    """The postmaster of the server at ``postgres_url`` (the parent of our backend), if it is local."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        proc = procstat.read(backend)
    return proc.ppid if proc is not None and proc.comm == "postgres" else None


def _commands(first: dict[str, tuple[int, int]], last: dict[str, tuple[int, int]], per_tx: float) -> dict:
    """commandstats between two snapshots, most time first (µs/tx per transaction of the window)."""
    commands = {}
    for name, (calls, usec) in last.items():
        calls0, usec0 = first.get(name, (0, 0))
        if calls > calls0:
            commands[name] = {"calls": calls - calls0, "usec": usec - usec0, "us_per_tx": round((usec - usec0) * per_tx / 1e6, 3)}
    return dict(sorted(commands.items(), key=lambda item: -item[1]["usec"]))


def usage(first: Snapshot, last: Snapshot, transactions: int, seconds: float) -> Usage:
    """What was spent between two snapshots, for ``transactions`` moved in ``seconds``."""
    per_tx = 1e6 / transactions if transactions else 0.0
    cpu = {name: last.cpu_s[name] - first.cpu_s.get(name, 0.0) for name in last.cpu_s}
    nodes = {}
    totals: dict[str, tuple[int, int]] = {}
    for name, node in last.redis_nodes.items():
        before = first.redis_nodes[name]
        nodes[name] = {
            "cpu_s": round(node.best_cpu_s - before.best_cpu_s, 3),
            "cpu_us_per_tx": round((node.best_cpu_s - before.best_cpu_s) * per_tx, 2),
            "info_cpu_us_per_tx": round((node.info_cpu_s - before.info_cpu_s) * per_tx, 2),
            "commands": _commands(before.commands, node.commands, per_tx),
        }
        for command, spent in nodes[name]["commands"].items():
            calls, usec = totals.get(command, (0, 0))
            totals[command] = (calls + spent["calls"], usec + spent["usec"])
    machine = last.machine_busy_s - first.machine_busy_s
    return Usage(
        transactions=transactions,
        seconds=seconds,
        cpu_s=cpu,
        cpu_us_per_tx={name: value * per_tx for name, value in cpu.items()},
        pipeline_cpu_us_per_tx=sum(v for k, v in cpu.items() if k in PIPELINE) * per_tx,
        machine_busy_s=machine,
        other_cpu_s=machine - sum(cpu.values()),
        redis_info_cpu_us_per_tx=sum(last.redis_nodes[n].info_cpu_s - first.redis_nodes[n].info_cpu_s for n in last.redis_nodes)
        * per_tx,
        redis_commands=_commands({}, totals, per_tx),
        redis_nodes=nodes,
    )
