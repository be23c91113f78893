"""Redis clients of fraudd: one Redis, or a Redis Cluster reached node by node.

No metrics here: the command line imports this before it has set prometheus-client's directory.

On a Redis Cluster every call of a shard's batch touches the shard's slot only, so it is sent as is
to the node serving that slot (``on_node``): packed and parsed as on a single Redis, without the
cluster client's per-command key parsing. When that node failed or the slot moved, the call
learns the slot map again and raises, and the caller waits the outage out and retries.
``AsyncNodes`` does the same for asyncio code (the HTTP ingest).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
from redis.asyncio.cluster import PipelineCommand
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster

from ..keys import hash_tag
from .redis_wire import pack, refresh_slots, refresh_slots_async, round_trip_async

# Every error a call to Redis can end with. redis-py's cluster client raises some outside
# ``redis.RedisError``: no node of the cluster reachable (``RedisClusterUnreachableError``), no
# slot map (``SlotNotCoveredError``); a loop that must outlive an outage catches these too.
REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException)

_T = TypeVar("_T")


def redis_client(url: str, cluster: bool = False, **options: Any) -> redis.Redis | RedisCluster:
    """A client of the Redis at ``url``, or with ``cluster`` of the Redis Cluster whose seed nodes
    ``url`` lists, comma-separated; ``options`` go to redis-py (``decode_responses``, timeouts)."""
    options = {"protocol": 2, **options}
    if not cluster:
        return redis.Redis.from_url(url, **options)
    return RedisCluster(**_cluster_options(url, ClusterNode), **options)


@overload
def async_redis_client(url: str, cluster: Literal[False] = False, **options: Any) -> redis.asyncio.Redis: ...
@overload
def async_redis_client(url: str, cluster: Literal[True], **options: Any) -> redis.asyncio.cluster.RedisCluster: ...
@overload
def async_redis_client(url: str, cluster: bool, **options: Any) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster: ...
def async_redis_client(
    url: str, cluster: bool = False, **options: Any
) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """``redis_client`` for an asyncio event loop."""
    options = {"protocol": 2, **options}
    if not cluster:
        return redis.asyncio.Redis.from_url(url, **options)
    return redis.asyncio.cluster.RedisCluster(**_cluster_options(url, redis.asyncio.cluster.ClusterNode), **options)


def _seeds(url: str) -> list[urllib.parse.SplitResult]:
    return [urllib.parse.urlsplit(seed.strip()) for seed in url.split(",") if seed.strip()]


def _cluster_options(url: str, node: type) -> dict[str, Any]:
    """The cluster client's start-up nodes (of redis-py's sync or asyncio ``ClusterNode`` class) and
    credentials, from the seed URLs."""
    seeds = _seeds(url)
    # Without full coverage the client still starts while a failed master's slots wait for a
    # replica: those slots answer CLUSTERDOWN, an outage waited out, instead of a crash at start.
    return {
        "startup_nodes": [node(seed.hostname or "127.0.0.1", seed.port or 6379) for seed in seeds],
        "require_full_coverage": False,
        "username": seeds[0].username,
        "password": seeds[0].password,
    }


def connect_redis(url: str, cluster: bool = False) -> redis.Redis | RedisCluster:
    """A client whose stream replies stay raw: decoding them per batch is cheaper than redis-py's per-entry dicts.

    On a cluster, the node clients that ``node_client`` hands out reply raw."""
    client = redis_client(
        url,
        cluster,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=0,
        **({} if cluster else {"retry_on_timeout": False}),
    )
    if isinstance(client, redis.Redis):
        _raw_stream_replies(client)
    return client


def _raw(response: Any, **options: Any) -> Any:
    return response


def _raw_stream_replies(client: redis.Redis) -> None:
    # XCLAIM too: redis-py parses its reply as entries, which a JUSTID reply (bare ids) is not.
    for command in ("XREADGROUP", "XAUTOCLAIM", "XPENDING", "XCLAIM"):
        client.set_response_callback(command, _raw)


# The generic errors callers tell apart, as ``redis_error_code`` gives them.
FUNCTION_NOT_FOUND = "function not found"  # FCALL after a restart without persistence, or FUNCTION FLUSH
NO_SUCH_KEY = "no such key"  # XINFO of a stream nothing was written to yet


def redis_error_code(exc: redis.ResponseError) -> str:
    """Which error Redis replied: the code it starts the reply with (``NOGROUP``, ``BUSYGROUP``, or
    ``FENCED`` from fraudd's own scripts), or for the generic ``ERR``, whose code redis-py drops,
    the message in lower case (``FUNCTION_NOT_FOUND``, ``NO_SUCH_KEY``); from a pipeline as from a
    single command."""
    # redis-py puts where in a pipeline an error came from before its message.
    message = str(exc).rpartition(" of pipeline caused error: ")[2]
    code = message.split(" ", 1)[0]
    return code if code.isupper() and code.isalpha() else message.lower()


# What a command sent straight to a cluster node meets when the node failed or the slot moved, or
# when the slot map learnt during a failover has no node for the slot yet.
CLUSTER_CHANGED = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.AskError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
)


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


def on_node(
    client: redis.Redis | RedisCluster, key: str, send: Callable[[redis.Redis], _T], node: redis.Redis | None = None
) -> _T:
    """``send(node_client(client, key))``, or ``send(node)`` when the caller pinned the node it
    found earlier; when the cluster changed under it, learn the slot map again and raise: the
    caller waits the outage out (``until_done``) and retries on the new map."""
    try:
        return send(node if node is not None else node_client(client, key))
    except CLUSTER_CHANGED:
        refresh_slots(client)
        raise


# How long a write that must outlive its master waits for a replica to confirm it (Redis Cluster): a
# replica on the same network answers in well under a millisecond. After a wait that timed out (the
# master has no live replica) writes to that key go unwaited for REPLICA_RETRY_S.
REPLICA_WAIT_MS = 100
REPLICA_RETRY_S = 5.0


def _probe(key: str) -> tuple[str, str, int, str, int]:
    """A write in ``key``'s slot that leaves nothing behind (it expires): what ``ReplicaWait`` waits on."""
    return ("SET", f"fraudd:{{{hash_tag(key)}}}:replica-probe", 1, "PX", 10 * REPLICA_WAIT_MS)


class ReplicaWait:
    """``WAIT 1`` on the master of a key just written, so that a master dying right after does not take
    the write with it while what depends on it (an ack, a row's status) survives elsewhere.

    WAIT counts the replicas holding what its own connection wrote last, and a pooled client may
    send it on another connection than the write's (one that wrote nothing answers at once, with
    every connected replica). So the wait writes a probe of its own in the key's slot on the
    connection it waits on: replication is in order, so a replica holding the probe holds the
    write made before it, whichever connection made it.

    Without a live replica the write is as safe as that master: a wait that timed out is not tried
    again for REPLICA_RETRY_S, so a master left without replicas costs one timeout per REPLICA_RETRY_S,
    not one per write."""

    def __init__(self) -> None:
        self._unreplicated_until: dict[str, float] = {}

    def wait(self, client: redis.Redis | RedisCluster, key: str) -> None:
        if self.due(key):
            self.waited(
                key,
                on_node(
                    client,
                    key,
                    lambda node: (
                        node.pipeline(transaction=False)
                        .execute_command(*_probe(key))
                        .execute_command("WAIT", 1, REPLICA_WAIT_MS)
                        .execute()[1]
                    ),
                ),
            )

    async def wait_async(self, client: redis.asyncio.cluster.RedisCluster, key: str) -> None:
        """``wait`` with the asyncio cluster client."""
        if self.due(key):
            commands = [PipelineCommand(0, *_probe(key)), PipelineCommand(1, "WAIT", 1, REPLICA_WAIT_MS)]
            await _master(client, key).execute_pipeline(commands)
            probe, wait = commands
            if isinstance(probe.result, Exception):
                raise probe.result
            if isinstance(wait.result, Exception):
                raise wait.result
            self.waited(key, wait.result)

    def due(self, key: str) -> bool:
        """Whether a write to ``key`` is to be waited for (its master had a replica lately)."""
        return time.monotonic() >= self._unreplicated_until.get(key, 0.0)

    def waited(self, key: str, replicas: int) -> None:
        """What a ``WAIT`` after a write to ``key`` answered: how many replicas have it."""
        if replicas == 0:
            self._unreplicated_until[key] = time.monotonic() + REPLICA_RETRY_S


def _master(client: redis.asyncio.cluster.RedisCluster, key: str) -> redis.asyncio.cluster.ClusterNode:
    """The master serving ``key``'s slot (``SlotNotCoveredError`` when none does): redis-py's lookup
    is typed optional for the replica it may be asked for instead."""
    node = client.get_node_from_key(key)
    if node is None:
        raise redis.exceptions.SlotNotCoveredError(f"no node serves the slot of {key}")
    return node


class AsyncNodes:
    """The asyncio clients of one Redis, or of each node of a Redis Cluster: ``node(key)`` is the
    plain client of the node serving ``key``'s slot (the one client off a cluster), so one slot's
    commands go out packed as on a single Redis. A call that meets a cluster change (failed node,
    moved slot, CLUSTERDOWN) learns the slot map again and raises a ``redis.RedisError``; the caller
    answers 503 or tries again later, on the new map.

    The slot map starts unknown and is learnt on first use, so a process may start while the
    cluster is away (its calls fail meanwhile, as on a single Redis that is down).
    """

    def __init__(self, url: str, cluster: bool = False, **options: Any) -> None:
        """``options`` go to redis-py's clients (timeouts)."""
        self.cluster = cluster
        # One retry, at once: enough for a connection the server closed while idle. redis-py's
        # default (ten, backing off up to a second) would hold a request for seconds on a node
        # that is gone, where an answer of 503 lets the client retry when it comes back.
        self._options = {"protocol": 2, "health_check_interval": 0, "retry": redis.asyncio.retry.Retry(NoBackoff(), 1), **options}
        self._clients: dict[str, redis.asyncio.Redis] = {}
        self._replicas = ReplicaWait()
        self._mapped = False
        if cluster:
            # Only for the slot map: commands go to plain clients of the nodes, made in ``node``.
            self._map = async_redis_client(url, True, **{k: v for k, v in self._options.items() if k != "retry"})
            seed = _seeds(url)[0]
            self._options.update(username=seed.username, password=seed.password)
        else:
            self._single = async_redis_client(url, False, **self._options)

    async def node(self, key: str) -> redis.asyncio.Redis:
        """The client of the node serving ``key``'s slot; ``ClusterDownError`` when none does (yet)."""
        if not self.cluster:
            return self._single
        if not self._mapped:
            await self.refresh()
        try:
            node = _master(self._map, key)
        except redis.exceptions.RedisClusterException:  # the map is unknown, or lacks the slot
            raise redis.exceptions.ClusterDownError(f"no known node serves the slot of {key}") from None
        client = self._clients.get(node.name)
        if client is None:
            client = self._clients[node.name] = redis.asyncio.Redis(host=node.host, port=int(node.port), **self._options)
        return client

    async def on_node(self, key: str, send: Callable[[redis.asyncio.Redis], Awaitable[_T]]) -> _T:
        """``await send(node)`` with the node serving ``key``; on a cluster change, learn the slot
        map again and raise."""
        try:
            return await send(await self.node(key))
        except CLUSTER_CHANGED:
            await self.refresh()
            raise

    async def send(self, key: str, commands: list[bytes], replicated: bool = False) -> list[Any]:
        """The replies of ``commands`` (packed with hiredis: redis-py's own packing inspects each
        argument in Python) sent in one write to the node serving ``key``. ``replicated`` on a
        cluster: a replica holds them too before this returns (``WAIT``, in the same round trip),
        so a master dying right after does not take back what the caller was told is written."""

        async def attempt(node: redis.asyncio.Redis) -> list[Any]:
            wait = replicated and self.cluster and self._replicas.due(key)
            packed = [*commands, _WAIT] if wait else commands
            replies = await round_trip_async(node, packed)
            if wait:
                self._replicas.waited(key, replies.pop())
            return replies

        return await self.on_node(key, attempt)

    async def refresh(self) -> None:
        """Learn the cluster's slot map again (best effort: while the cluster is down the next call
        fails again, and refreshes again)."""
        if not self.cluster:
            return
        try:
            if self._mapped:
                await refresh_slots_async(self._map)
            else:
                await self._map.initialize()
                self._mapped = True
        except (*REDIS_FAILURES, OSError):
            pass

    async def aclose(self) -> None:
        if not self.cluster:
            await self._single.aclose()
            return
        for client in self._clients.values():
            await client.aclose()
        await self._map.aclose()


_WAIT = pack(("WAIT", 1, REPLICA_WAIT_MS))
