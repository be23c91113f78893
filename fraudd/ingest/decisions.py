"""The way back for ``POST /v1/score``: decisions from the workers, or from PostgreSQL.

Each ingest process is one instance with a channel of its own per input shard
(``Keys.decisions_channel``). A ``/v1/score`` entry carries its shard's channel in its ``reply``
field; the worker that stores the entry's decision sends the decisions of its batch for this
instance in one sharded-pub/sub message (a JSON array) once they are durable. Here one
subscription per process hands each decision to the request waiting for its ``transaction_id``.

A duplicate was written earlier, maybe by another instance or without a reply channel, so its
decision is read from ``transactions`` where it is (or will shortly be) stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import orjson
import psycopg
import redis
import redis.asyncio

from ..runtime.redis_clients import REDIS_FAILURES, AsyncNodes
from ..schema import connect_async

log = logging.getLogger(__name__)

_RESUBSCRIBE_DELAY_S = 0.5
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05


def instance_name() -> str:
    """Unique per process and life: a decision meant for a dead process is dropped, not misrouted."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Decisions:
    """Waiters by ``transaction_id``, resolved from this instance's channels (one per input shard,
    each in its shard's slot, as the worker publishes from its shard's settle script).

    A channel is subscribed on the node serving its slot: one subscription per node, following the
    slot map (``AsyncNodes``), so when a node fails or gives a slot away (a failover, resharding)
    its channels are subscribed again where their slots went. A decision published meanwhile is
    not received: its waiter is told (``None``) and reads it from PostgreSQL instead.
    """

    def __init__(self, nodes: AsyncNodes, channels: list[str]) -> None:
        self.channels = channels
        self._nodes = nodes
        self._waiting: dict[str, tuple[asyncio.Future, str]] = {}
        self._live: set[str] = set()  # channels subscribed, with no break since
        self._task: asyncio.Task | None = None
        self._broken = False  # logged once per episode
        # Why stop() does not rely on the cancel alone: redis-py swallows a cancel that lands while
        # a connection does its handshake (its connect() returns normally), and the subscription
        # would then go on until the process is killed. Both loops end at their next turn instead.
        self._stopping = False

    def start(self) -> None:
        """Subscribe in the background (Redis may be away at start: the API serves meanwhile)."""
        self._task = asyncio.create_task(self._listen())

    @property
    def subscribed(self) -> bool:
        return len(self._live) == len(self.channels)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def expect(self, transaction_id: str, channel: str) -> tuple[asyncio.Future, bool]:
        """The future of ``transaction_id``'s decision (published on ``channel``), and whether this
        call created it (False: another request of this instance already waits for the same
        transaction). It resolves to None when the decision cannot arrive: the channel is not
        subscribed now, or its subscription breaks before the decision came."""
        waiting = self._waiting.get(transaction_id)
        if waiting is not None:
            return waiting[0], False
        future = asyncio.get_running_loop().create_future()
        if channel in self._live:
            self._waiting[transaction_id] = (future, channel)
        else:
            future.set_result(None)
        return future, True

    def forget(self, transaction_id: str, future: asyncio.Future) -> None:
        waiting = self._waiting.get(transaction_id)
        if waiting is not None and waiting[0] is future:
            del self._waiting[transaction_id]

    async def _listen(self) -> None:
        """Keep one subscription per node serving some of the channels, as the slot map says."""
        links: dict[redis.asyncio.Redis, tuple[frozenset[str], asyncio.Task]] = {}
        try:
            while not self._stopping:
                try:
                    serving = await self._serving()
                except (*REDIS_FAILURES, OSError):
                    serving = None  # the map is unknown yet: keep what is subscribed
                for node, (channels, task) in list(links.items()):
                    if task.done() or (serving is not None and serving.get(node) != channels):
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        del links[node]
                for node, channels in (serving or {}).items():
                    if node not in links:
                        links[node] = (channels, asyncio.create_task(self._follow(node, channels)))
                tasks = [task for _channels, task in links.values()]
                # Woken by a broken link, else once a second to follow the map, which calls that
                # met a cluster change have learnt again.
                done = (await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED))[0] if tasks else ()
                if done or serving is None:
                    await self._nodes.refresh()
                    await asyncio.sleep(_RESUBSCRIBE_DELAY_S)
        finally:
            for _channels, task in links.values():
                task.cancel()
            await asyncio.gather(*(task for _channels, task in links.values()), return_exceptions=True)

    async def _serving(self) -> dict[redis.asyncio.Redis, frozenset[str]]:
        serving: dict[redis.asyncio.Redis, set[str]] = {}
        for channel in self.channels:
            serving.setdefault(await self._nodes.node(channel), set()).add(channel)
        return {node: frozenset(channels) for node, channels in serving.items()}

    async def _follow(self, node: redis.asyncio.Redis, channels: frozenset[str]) -> None:
        """Subscribe ``channels`` on ``node`` and deliver what arrives, until the subscription breaks."""
        pubsub = node.pubsub()
        try:
            # One command per channel: each lives in its own shard's slot.
            for channel in channels:
                await pubsub.ssubscribe(channel)
            while not self._stopping:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "smessage":
                    self._deliver(message["data"])
                elif kind == "ssubscribe":
                    # Confirmed: from now on a decision published there reaches this process.
                    self._live.add(message["channel"].decode())
                    if self.subscribed and self._broken:
                        self._broken = False
                        log.info("decision channels subscribed again", extra={"event": "recovered", "component": "redis"})
                elif kind == "sunsubscribe":
                    # Not asked for: the node gave the channel's slot away (resharding, or it
                    # became a replica). Subscribe again where the map says.
                    return
        except (*REDIS_FAILURES, OSError) as exc:
            if not self._broken:
                self._broken = True
                log.error(
                    "decision channel lost, resubscribing", extra={"event": "outage", "component": "redis", "error": str(exc)}
                )
        finally:
            self._lost(channels)
            await pubsub.aclose()

    def _lost(self, channels: frozenset[str]) -> None:
        """Decisions sent on ``channels`` may be missed from now on: their waiters read PostgreSQL."""
        self._live -= channels
        for transaction_id, (future, channel) in list(self._waiting.items()):
            if channel in channels:
                del self._waiting[transaction_id]
                if not future.done():
                    future.set_result(None)

    def _deliver(self, data: bytes) -> None:
        try:
            decisions = {d["transaction_id"]: d for d in orjson.loads(data)}
        except (ValueError, TypeError, KeyError) as exc:
            # Not what workers send: drop it rather than the subscription.
            log.error("unreadable decisions message", extra={"event": "bad_decisions_message", "error": repr(exc)})
            return
        for transaction_id, decision in decisions.items():
            future, _channel = self._waiting.pop(transaction_id, (None, None))
            if future is not None and not future.done():
                future.set_result(decision)


class StoredDecisions:
    """Reads a transaction's stored decision from PostgreSQL (one connection per process)."""

    def __init__(self, url: str, pg_schema: str) -> None:
        self._url = url
        self._schema = pg_schema
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def wait_for(self, transaction_id: str, deadline: float) -> dict | None:
        """The stored decision, polled until ``deadline`` (``time.monotonic``) while it is not there
        yet (the worker has not stored the earlier copy); None when it did not appear in time."""
        delay = _POLL_FIRST_S
        while True:
            try:
                found = await self._lookup(transaction_id)
            except (psycopg.Error, OSError) as exc:
                log.warning("stored decision lookup failed", extra={"event": "lookup_failed", "error": str(exc)})
                found = None
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX_S)

    async def _lookup(self, transaction_id: str) -> dict | None:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await connect_async(
                    self._url, self._schema, autocommit=True, connect_timeout=2, application_name="fraudd-ingest"
                )
            try:
                # float8: the stored float32 exactly, rounded as the worker rounds its answer (a
                # real's text form is its shortest decimal, which can round the other way).
                cursor = await self._conn.execute(
                    "SELECT stream_id, decision, score::float8, reasons, model_version, explanation FROM transactions"
                    " WHERE transaction_id = %s LIMIT 1",
                    (transaction_id,),
                )
                row = await cursor.fetchone()
            except psycopg.OperationalError:
                await self._conn.close()
                raise
        if row is None:
            return None
        stream_id, decision, score, reasons, model_version, explanation = row
        return {
            "transaction_id": transaction_id,
            "id": stream_id,
            "decision": decision,
            "score": round(float(score), 6),
            "reasons": list(reasons),
            "model_version": model_version,
            "explanation": explanation,
        }
