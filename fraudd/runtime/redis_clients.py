"""Redis clients of fraudd: one Redis, or a Redis Cluster reached node by node.

No metrics here: the command line imports this before it has set prometheus-client's directory.

On a Redis Cluster every call of a shard's batch touches the shard's slot only, so it is sent as is
to the node serving that slot (``on_node``): packed and parsed as on a single Redis, without the
cluster client's per-command key parsing. When that node failed or the slot moved, the call
learns the slot map again and raises, and the caller waits the outage out and retries.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import ClusterNode, RedisCluster

_T = TypeVar("_T")


def redis_client(url: str, cluster: bool = False, **options) -> redis.Redis | RedisCluster:
    """A client of the Redis at ``url``, or with ``cluster`` of the Redis Cluster whose seed nodes
    ``url`` lists, comma-separated; ``options`` go to redis-py (``decode_responses``, timeouts)."""
    options = {"protocol": 2, **options}
    if not cluster:
        return redis.Redis.from_url(url, **options)
    seeds = _seeds(url)
    # Without full coverage the client still starts while a failed master's slots wait for a
    # replica: those slots answer CLUSTERDOWN, an outage waited out, instead of a crash at start.
    return RedisCluster(startup_nodes=[ClusterNode(seed.hostname or "127.0.0.1", seed.port or 6379) for seed in seeds],
                        require_full_coverage=False, username=seeds[0].username, password=seeds[0].password,
                        **options)


def async_redis_client(url: str, cluster: bool = False,
                       **options) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """``redis_client`` for an asyncio event loop."""
    options = {"protocol": 2, **options}
    if not cluster:
        return redis.asyncio.Redis.from_url(url, **options)
    seeds = _seeds(url)
    return redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(seed.hostname or "127.0.0.1", seed.port or 6379) for seed in seeds],
        require_full_coverage=False, username=seeds[0].username, password=seeds[0].password, **options)


def _seeds(url: str) -> list[urllib.parse.SplitResult]:
    return [urllib.parse.urlsplit(seed.strip()) for seed in url.split(",") if seed.strip()]


def connect_redis(url: str, cluster: bool = False) -> redis.Redis | RedisCluster:
    """A client whose stream replies stay raw: decoding them per batch is cheaper than redis-py's per-entry dicts.

    On a cluster, the node clients that ``node_client`` hands out reply raw."""
    client = redis_client(url, cluster, socket_timeout=10, socket_connect_timeout=5, health_check_interval=0,
                          **({} if cluster else {"retry_on_timeout": False}))
    if not cluster:
        _raw_stream_replies(client)
    return client


def _raw(response, **options):
    return response


def _raw_stream_replies(client: redis.Redis) -> None:
    # XCLAIM too: redis-py parses its reply as entries, which a JUSTID reply (bare ids) is not.
    for command in ("XREADGROUP", "XAUTOCLAIM", "XPENDING", "XCLAIM"):
        client.set_response_callback(command, _raw)


# What a command sent straight to a cluster node meets when the node failed or the slot moved, or
# when the slot map learnt during a failover has no node for the slot yet.
CLUSTER_CHANGED = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.AskError, redis.exceptions.ClusterError,
                   redis.exceptions.TryAgainError, redis.ReadOnlyError, redis.exceptions.SlotNotCoveredError)


def node_client(client: redis.Redis | RedisCluster, key: str) -> redis.Redis:
    """The plain client of the node serving ``key``'s slot (``client`` itself off a cluster): one
    slot's commands packed and sent as on a single Redis, without the cluster client's per-command
    key parsing, and with raw stream replies."""
    if not isinstance(client, RedisCluster):
        return client
    node = client.get_redis_connection(client.get_node_from_key(key))
    if node.response_callbacks.get("XPENDING") is not _raw:
        _raw_stream_replies(node)
    return node


def on_node(client: redis.Redis | RedisCluster, key: str, send: Callable[[redis.Redis], _T]) -> _T:
    """``send(node_client(client, key))``; when the cluster changed under it, learn the slot map
    again and raise: the caller waits the outage out (``until_done``) and retries on the new map."""
    try:
        return send(node_client(client, key))
    except CLUSTER_CHANGED:
        refresh_slots(client)
        raise


def refresh_slots(client: redis.Redis | RedisCluster) -> None:
    """After a node failed or a slot moved, learn the cluster's slot map again (best effort: while
    the cluster is down the next attempt fails again, and refreshes again)."""
    if isinstance(client, RedisCluster):
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            pass


# How long a write that must outlive its master waits for a replica to confirm it (Redis Cluster): a
# replica on the same network answers in well under a millisecond. After a wait that timed out (the
# master has no live replica) writes to that key go unwaited for REPLICA_RETRY_S.
REPLICA_WAIT_MS = 100
REPLICA_RETRY_S = 5.0


class ReplicaWait:
    """``WAIT 1`` on the master of a key just written, so that a master dying right after does not take
    the write with it while what depends on it (an ack, a row's status) survives elsewhere.

    Without a live replica the write is as safe as that master: a wait that timed out is not tried
    again for REPLICA_RETRY_S, so a master left without replicas costs one timeout per REPLICA_RETRY_S,
    not one per write."""

    def __init__(self) -> None:
        self._unreplicated_until: dict[str, float] = {}

    def wait(self, client: redis.Redis | RedisCluster, key: str) -> None:
        if self._due(key):
            self._waited(key, on_node(client, key, lambda node: node.execute_command("WAIT", 1, REPLICA_WAIT_MS)))

    async def wait_async(self, client: redis.asyncio.cluster.RedisCluster, key: str) -> None:
        """``wait`` with the asyncio cluster client."""
        if self._due(key):
            self._waited(key, await client.execute_command("WAIT", 1, REPLICA_WAIT_MS,
                                                           target_nodes=client.get_node_from_key(key)))

    def _due(self, key: str) -> bool:
        return time.monotonic() >= self._unreplicated_until.get(key, 0.0)

    def _waited(self, key: str, replicas: int) -> None:
        if replicas == 0:
            self._unreplicated_until[key] = time.monotonic() + REPLICA_RETRY_S
