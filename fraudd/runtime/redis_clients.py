"""Redis clients of fraudd: one Redis, or a Redis Cluster reached node by node.

No metrics here: the command line imports this before it has set prometheus-client's directory.

On a Redis Cluster every call of a shard's batch touches the shard's slot only, so it is sent as is
to the node serving that slot (``on_node``): packed and parsed as on a single Redis, without the
cluster client's per-command key parsing. When that node failed or the slot moved, the call
learns the slot map again and raises, and the caller waits the outage out and retries.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster

_T = TypeVar("_T")


def redis_client(url: str, cluster: bool = False, **options) -> redis.Redis | RedisCluster:
    """A client of the Redis at ``url``, or with ``cluster`` of the Redis Cluster whose seed nodes
    ``url`` lists, comma-separated; ``options`` go to redis-py (``decode_responses``, timeouts)."""
    options = {"protocol": 2, **options}
    if not cluster:
        return redis.Redis.from_url(url, **options)
    seeds = [urllib.parse.urlsplit(seed.strip()) for seed in url.split(",") if seed.strip()]
    # Without full coverage the client still starts while a failed master's slots wait for a
    # replica: those slots answer CLUSTERDOWN, an outage waited out, instead of a crash at start.
    return RedisCluster(startup_nodes=[ClusterNode(seed.hostname or "127.0.0.1", seed.port or 6379) for seed in seeds],
                        require_full_coverage=False, username=seeds[0].username, password=seeds[0].password,
                        **options)


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


# What a command sent straight to a cluster node meets when the node failed or the slot moved.
CLUSTER_CHANGED = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.AskError, redis.exceptions.ClusterError,
                   redis.exceptions.TryAgainError, redis.ReadOnlyError)


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
