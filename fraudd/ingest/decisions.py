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
    each in its shard's slot, as the worker publishes from its shard's settle script)."""

    def __init__(self, client: redis.asyncio.Redis, channels: list[str]) -> None:
        self.channels = channels
        self._client = client
        self._waiting: dict[str, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._subscribed = asyncio.Event()

    def start(self) -> None:
        """Subscribe in the background (Redis may be away at start: the API serves meanwhile)."""
        self._task = asyncio.create_task(self._listen())

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def expect(self, transaction_id: str) -> tuple[asyncio.Future, bool]:
        """The future of ``transaction_id``'s decision, and whether this call created it (False:
        another request of this instance already waits for the same transaction)."""
        future = self._waiting.get(transaction_id)
        if future is not None:
            return future, False
        future = asyncio.get_running_loop().create_future()
        self._waiting[transaction_id] = future
        return future, True

    def forget(self, transaction_id: str, future: asyncio.Future) -> None:
        if self._waiting.get(transaction_id) is future:
            del self._waiting[transaction_id]

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            confirmed = 0
            try:
                # One command per channel: on Redis Cluster each lives in its own shard's slot.
                for channel in self.channels:
                    await pubsub.ssubscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "smessage":
                        self._deliver(message["data"])
                    elif message["type"] == "ssubscribe":
                        # Confirmed: from now on a decision published there reaches this process.
                        confirmed += 1
                        if confirmed == len(self.channels):
                            self._subscribed.set()
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except (redis.RedisError, OSError) as exc:
                # Decisions sent while unsubscribed are lost; their requests answer the fallback
                # and the transactions are still scored and stored.
                self._subscribed.clear()
                log.error("decision channel lost, resubscribing", extra={"event": "outage", "component": "redis",
                                                                         "error": str(exc)})
                await pubsub.aclose()
                await asyncio.sleep(_RESUBSCRIBE_DELAY_S)

    def _deliver(self, data: bytes) -> None:
        try:
            decisions = {d["transaction_id"]: d for d in orjson.loads(data)}
        except (ValueError, TypeError, KeyError) as exc:
            # Not what workers send: drop it rather than the subscription.
            log.error("unreadable decisions message", extra={"event": "bad_decisions_message", "error": repr(exc)})
            return
        for transaction_id, decision in decisions.items():
            future = self._waiting.pop(transaction_id, None)
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
                self._conn = await connect_async(self._url, self._schema, autocommit=True, connect_timeout=2,
                                                 application_name="fraudd-ingest")
            try:
                cursor = await self._conn.execute(
                    "SELECT stream_id, decision, score, reasons, model_version FROM transactions"
                    " WHERE transaction_id = %s LIMIT 1", (transaction_id,))
                row = await cursor.fetchone()
            except psycopg.OperationalError:
                await self._conn.close()
                raise
        if row is None:
            return None
        stream_id, decision, score, reasons, model_version = row
        return {"transaction_id": transaction_id, "id": stream_id, "decision": decision,
                "score": round(float(score), 6), "reasons": list(reasons), "model_version": model_version}
