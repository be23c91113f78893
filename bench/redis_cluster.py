"""A throwaway Redis Cluster on free ports, node by node: what the benchmark grows from one master and
the tests fail over and reshard. Not shipped with fraudd (the daemon only talks to clusters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fraudd.localservers import START_TIMEOUT_S, RedisServer, free_port, wait_until

# A failed master's replica takes over after this long without an answer (redis.conf's default is
# 15 s, far longer than a test or a benchmark wants to wait).
CLUSTER_NODE_TIMEOUT_MS = 1000
# Redis Cluster's hash slots, shared out among the masters.
SLOTS = 16384


@dataclass
class RedisClusterServers:
    """A Redis Cluster of ``masters`` masters (one or more) with ``replicas`` replicas each (none or
    more), every node a ``RedisServer`` of its own in a subdirectory of ``directory``.

    Created as ``redis-cli --cluster create`` does, but by hand, because that tool refuses fewer
    than three masters and the benchmark grows a cluster from one: each master takes an even,
    contiguous share of the 16,384 slots and a distinct config epoch, every node meets the first,
    and replica j follows master j mod ``masters``. ``persistent`` and ``config`` go to every node
    (``RedisServer``).
    """

    directory: Path
    masters: int = 3
    replicas: int = 1
    persistent: bool = True
    config: dict[str, str] = field(default_factory=dict)
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node as a seed, as ``--redis-url`` takes them with ``--redis-cluster``."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        for i in range(self.masters * (1 + self.replicas)):
            node_dir = self.directory / f"node{i}"
            node_dir.mkdir()
            node = RedisServer(
                node_dir,
                persistent=self.persistent,
                config={
                    **self.config,
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": str(CLUSTER_NODE_TIMEOUT_MS),
                    # The default bus port, port + 10000, may be taken or past 65535.
                    "cluster-port": str(free_port()),
                    # A replica may take over however long ago it heard from its master.
                    "cluster-replica-validity-factor": "0",
                    # Replicas sync at once instead of after the default 5 s wait
                    # for more replicas to share the transfer.
                    "repl-diskless-sync-delay": "0",
                },
            )
            node.start()
            self.nodes.append(node)
        ids = []
        for i, node in enumerate(self.nodes):
            with node.client() as client:
                ids.append(client.execute_command("CLUSTER", "MYID").decode())
                if i < self.masters:
                    first, last = SLOTS * i // self.masters, SLOTS * (i + 1) // self.masters - 1
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                    client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.config["cluster-port"])
        wait_until(self._acquainted, START_TIMEOUT_S, "every cluster node to know every other")
        for i, node in enumerate(self.nodes[self.masters :]):
            with node.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", ids[i % self.masters])
        wait_until(self._settled, START_TIMEOUT_S, "the cluster to agree on its slots and replicas")

    def _acquainted(self) -> bool:
        """Every node lists every node, itself included, past the handshake (a replica can only
        follow a master its node knows)."""
        for node in self.nodes:
            with node.client() as client:
                lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            if len(lines) != len(self.nodes) or any("handshake" in line.split()[2] for line in lines):
                return False
        return True

    def _settled(self) -> bool:
        """Every node says the cluster is ok and sees every master's replicas."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    nodes = client.execute_command("CLUSTER", "NODES").decode()
                    replication = client.info("replication")
            except redis.RedisError:
                return False
            replicas = sum("slave" in line.split()[2] for line in nodes.splitlines() if line)
            synced = replication["role"] == "master" or replication.get("master_link_status") == "up"
            if "cluster_state:ok" not in info or replicas < self.masters * self.replicas or not synced:
                return False
        return True

    def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        return self.master_of_slot(self.slot_of(key))

    def slot_of(self, key: str) -> int:
        with self.live()[0].client() as client:
            return client.execute_command("CLUSTER", "KEYSLOT", key)

    def master_of_slot(self, slot: int, asked: RedisServer | None = None) -> RedisServer:
        """The node that serves ``slot`` now, as ``asked`` (any live node by default) sees it."""
        with (asked or self.live()[0]).client() as client:
            for start, end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The live nodes that replicate ``master`` now (CLUSTER SLOTS leaves out those that have
        not received a write yet)."""
        with master.client() as client:
            me = client.execute_command("CLUSTER", "MYID").decode()
            nodes = [line.split() for line in client.execute_command("CLUSTER", "NODES").decode().splitlines()]
        ports = {int(node[1].split("@")[0].rsplit(":", 1)[1]) for node in nodes if node[3] == me}
        return [node for node in self.live() if node.port in ports]

    def masters_now(self) -> list[RedisServer]:
        """The live nodes that serve slots now (replicas promoted by a failover included)."""
        with self.live()[0].client() as client:
            ports = {int(master[1]) for _start, _end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS")}
        return [node for node in self.live() if node.port in ports]

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def migrate_slot(
        self, slot: int, target: RedisServer, keys_per_step: int = 100, between_steps: Callable[[], None] = lambda: None
    ) -> None:
        """Move ``slot`` to master ``target`` while clients go on using it, as ``redis-cli --cluster
        reshard`` does: ``target`` IMPORTING the slot and its master MIGRATING it, the keys moved
        ``keys_per_step`` at a time by MIGRATE, then every master told the slot's new owner.

        While ``between_steps`` runs the slot is half moved: a command whose keys are all gone
        is answered ASK, one whose keys are on both sides TRYAGAIN; afterwards the old owner
        answers MOVED."""
        source = self.master_of_slot(slot)
        if source is target:
            return
        with source.client() as old, target.client() as new:
            source_id, target_id = (node.execute_command("CLUSTER", "MYID").decode() for node in (old, new))
            new.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            old.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := old.execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_step):
                old.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
                between_steps()
            # The new owner first, so the old one's MOVED never points at a node that still refuses.
            for node in (target, source, *[m for m in self.masters_now() if m not in (source, target)]):
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(
            lambda: all(self.master_of_slot(slot, node) is target for node in self.live()),
            START_TIMEOUT_S,
            f"every node to see slot {slot} on port {target.port}",
        )

    def fail_over(self, master: RedisServer) -> None:
        """SIGKILL ``master`` and wait until one of its replicas serves its slots."""
        port = master.port
        master.kill()

        def promoted() -> bool:
            for node in self.live():
                try:
                    with node.client() as client:
                        if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                            return False
                        slots = client.execute_command("CLUSTER", "SLOTS")
                except redis.RedisError:
                    return False
                if any(int(entry[2][1]) == port for entry in slots):
                    return False
            return True

        wait_until(promoted, START_TIMEOUT_S, f"a replica of the master on port {port} to take over")

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
