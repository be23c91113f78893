"""Putting transactions on the input stream.

``Publisher`` is the one way fraudd writes to ``transactions:raw``. Bulk writers (the demo, the
benchmark's producer, DLQ replay) call ``publish``: one script call per chunk appends many entries,
which costs Redis and the client a fraction of one XADD command per message.

The HTTP ingest calls ``submit`` from many concurrent requests. Whatever the requests of one
event-loop turn submitted goes out as one script call, and the calls made while one is in flight
wait for it and go out together next, so the number of round trips per second stays about fixed
while the batch grows with the load. The same script call is the idempotency check: a
``transaction_id`` the ingest accepted, or the worker counted, within the dedup window is answered
as a duplicate and not written again; one the ingest accepted with another body (by its
``fingerprint``) is answered as a conflict, as a reused idempotency key is in payment APIs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import hiredis
import orjson
import redis
import redis.exceptions
from redis.cluster import RedisCluster

from ..keys import Keys, shard_of, shard_stream
from ..runtime.redis_clients import AsyncNodes
from ..scoring.dedup import SEEN_PROBE_LUA, bucket_of, seen_probe

CHUNK = 1000
# Entries per script call: bounds the time one call holds Redis (≈ 5 µs per entry).
MAX_ITEMS_PER_CALL = 2000

_XADD_MANY = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
end
return ids
"""

# KEYS: the stream, then per item its accepted hash and its seen-marker probe key.
# ARGV: the dedup window (ms), then per item transaction_id, seen-probe member, payload, reply
#       channel ('' when nobody waits for the decision) and fingerprint.
# The accepted hash maps a transaction_id to "<entry id> <fingerprint>" (entry ids hold no space).
# Reply per item: the new entry id, or '=' followed by the id written earlier ('=' alone when the
# worker counted it but this ingest did not write it: it came another way), or '!' followed by the
# id written earlier when that was written with another fingerprint.
_ACCEPT = (
    SEEN_PROBE_LUA
    + """
local stream, window = KEYS[1], ARGV[1]
local out, refreshed = {}, {}
for i = 1, (#KEYS - 1) / 2 do
  local accepted, probe = KEYS[2 * i], KEYS[2 * i + 1]
  local a = 5 * i - 3
  local txid, reply, fingerprint = ARGV[a], ARGV[a + 3], ARGV[a + 4]
  local earlier = redis.call('HGET', accepted, txid)
  if earlier then
    local cut = string.find(earlier, ' ', 1, true)
    if cut and string.sub(earlier, cut + 1) ~= fingerprint then
      out[i] = '!' .. string.sub(earlier, 1, cut - 1)
    else
      out[i] = '=' .. (cut and string.sub(earlier, 1, cut - 1) or earlier)
    end
  elseif counted(probe, ARGV[a + 1]) then
    out[i] = '='
  else
    local id
    if reply == '' then
      id = redis.call('XADD', stream, '*', 'data', ARGV[a + 2])
    else
      id = redis.call('XADD', stream, '*', 'data', ARGV[a + 2], 'reply', reply)
    end
    redis.call('HSET', accepted, txid, id .. ' ' .. fingerprint)
    if not refreshed[accepted] then
      redis.call('PEXPIRE', accepted, window)
      refreshed[accepted] = true
    end
    out[i] = id
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Submission:
    """One valid transaction for the stream: its ids, event time, the exact ``data`` bytes, and
    the ``fingerprint`` of its content."""

    transaction_id: str
    user_id: str  # routes it to its shard
    event_s: float
    payload: bytes
    fingerprint: bytes
    reply: bool = False  # a request of this instance waits for its decision


def fingerprint(transaction: dict) -> bytes:
    """What tells a retry (the same transaction again) from a conflict (another transaction under
    the same ``transaction_id``): a digest of the content, so key order and spacing do not count."""
    return hashlib.blake2b(orjson.dumps(transaction, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class Accepted:
    """Where a submission went: ``id`` is its stream entry id; for a duplicate or a conflict, the
    earlier entry's id (None when it reached the stream another way than this ingest). A conflict
    was not written: the earlier entry has another body."""

    id: str | None
    duplicate: bool
    conflict: bool = False


class Publisher:
    """Appends payloads (the ``data`` field of DESIGN.md's input message) to a stream, or with
    ``shards`` > 1 to the shard stream of each payload's ``user_id`` (``keys.shard_of``): the one
    place that routes."""

    def __init__(self, client: redis.Redis | RedisCluster, stream: str, shards: int = 1) -> None:
        self._client = client
        self._stream = stream
        self._shards = shards
        self._script = client.register_script(_XADD_MANY)

    def publish(self, payloads: Sequence[bytes], shards: Sequence[int] | None = None) -> list[str]:
        """Append ``payloads`` in order (per shard); returns their entry ids. ``shards``: each
        payload's shard (``shard``), when the caller routed them ahead of time."""
        if self._shards == 1:
            return self._append([(self._stream, payloads)])[0]
        rows: dict[int, list[int]] = {}
        for row, shard in enumerate(map(self.shard, payloads) if shards is None else shards):
            rows.setdefault(shard, []).append(row)
        appended = self._append(
            [(shard_stream(self._stream, self._shards, shard), [payloads[r] for r in picked]) for shard, picked in rows.items()]
        )
        ids: list[str] = [""] * len(payloads)
        for picked, shard_ids in zip(rows.values(), appended):
            for row, entry_id in zip(picked, shard_ids):
                ids[row] = entry_id
        return ids

    def shard(self, payload: bytes) -> int:
        """The shard of one payload. One that has no readable ``user_id`` goes to shard 0, whose
        worker dead-letters it like any invalid entry."""
        try:
            user = orjson.loads(payload).get("user_id")
        except (orjson.JSONDecodeError, AttributeError):
            return 0
        return shard_of(user, self._shards) if isinstance(user, str) else 0

    def _append(self, appends: list[tuple[str, Sequence[bytes]]]) -> list[list[str]]:
        """The entry ids of each stream's payloads, appended by one script call per CHUNK: on one
        Redis all the calls in one round trip, on a Redis Cluster (each stream on its node) one by one."""
        calls = [
            (stream, list(payloads[start : start + CHUNK]))
            for stream, payloads in appends
            for start in range(0, len(payloads), CHUNK)
        ]
        if isinstance(self._client, RedisCluster) or len(calls) == 1:
            replies = [self._script(keys=[stream], args=chunk) for stream, chunk in calls]
        else:
            replies = self._pipelined(calls)
        ids: list[list[str]] = [[] for _ in appends]
        by_stream = {stream: k for k, (stream, _payloads) in enumerate(appends)}
        for (stream, _chunk), reply in zip(calls, replies):
            ids[by_stream[stream]] += [i.decode() if isinstance(i, bytes) else i for i in reply]
        return ids

    def _pipelined(self, calls: list[tuple[str, list[bytes]]]) -> list[list[bytes]]:
        """The script's calls sent in one pipeline; when Redis lost the script (a restart, SCRIPT
        FLUSH) none of them ran: it is loaded again and they are sent once more."""
        client = cast(redis.Redis, self._client)

        def send() -> list[list[bytes]]:
            pipe = client.pipeline(transaction=False)
            for stream, chunk in calls:
                pipe.evalsha(self._script.sha, 1, stream, *chunk)
            return cast(list[list[bytes]], pipe.execute())

        try:
            return send()
        except redis.exceptions.NoScriptError:
            client.script_load(_XADD_MANY)
        return send()


class CoalescingPublisher:
    """``submit`` for concurrent requests of one event loop; one script call per shard and turn of the loop.

    At most one round of calls is in flight: submissions made meanwhile queue up and go out together
    as soon as it returns. A shard's call goes to the node serving its slot (on a Redis Cluster, the
    shards' calls of a round run side by side, node by node); a failed call fails the requests that
    had a transaction in it, and only those. As each transaction is keyed by its ``transaction_id``,
    a client retry is safe whether or not the call reached Redis.
    """

    def __init__(self, nodes: AsyncNodes, keys: list[Keys], instance: str, dedup_window_ms: int) -> None:
        """``keys``: every input shard's (one without ``--shards``); ``instance``: the name of this
        ingest process, whose decisions channel per shard (``channels``) a ``reply`` names."""
        self._keys = keys
        self.channels = [k.decisions_channel(instance) for k in keys]
        self._window_ms = dedup_window_ms
        self._nodes = nodes
        self._sha = hashlib.sha1(_ACCEPT.encode()).hexdigest()
        self._queue: list[tuple[Sequence[Submission], asyncio.Future]] = []
        self._flushing = False

    def shard(self, user_id: str) -> int:
        return shard_of(user_id, len(self._keys)) if len(self._keys) > 1 else 0

    async def submit(self, submissions: Sequence[Submission]) -> list[Accepted]:
        """Write ``submissions`` (idempotently); raises ``redis.RedisError`` when Redis fails."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((submissions, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                # Whole requests, up to MAX_ITEMS_PER_CALL (a larger request goes alone).
                taken, items = 0, 0
                while taken < len(self._queue) and (taken == 0 or items + len(self._queue[taken][0]) <= MAX_ITEMS_PER_CALL):
                    items += len(self._queue[taken][0])
                    taken += 1
                batch, self._queue = self._queue[:taken], self._queue[taken:]
                try:
                    replies, failures = await self._route([s for submissions, _f in batch for s in submissions])
                except Exception as exc:  # handed to every waiting request; the loop goes on
                    replies, failures = [], dict.fromkeys(range(items), exc)
                start = 0
                for submissions, future in batch:
                    end = start + len(submissions)
                    failed = next((failures[r] for r in range(start, end) if r in failures), None) if failures else None
                    if not future.done():
                        if failed is None:
                            future.set_result([_accepted(reply) for reply in replies[start:end]])
                        else:
                            future.set_exception(failed)
                    start = end
        finally:
            self._flushing = False

    async def _route(self, submissions: list[Submission]) -> tuple[list[bytes], dict[int, Exception]]:
        """Each submission's reply, and by row the error of the shard calls that failed: one script
        call per shard the submissions go to (each call stays in its shard's slot)."""
        rows: dict[int, list[int]] = {}
        for row, s in enumerate(submissions):
            rows.setdefault(self.shard(s.user_id), []).append(row)
        if len(rows) == 1:
            ((shard, _rows),) = rows.items()
            return await self._call(shard, submissions), {}
        calls = list(rows.items())
        results = await asyncio.gather(
            *(self._call(shard, [submissions[r] for r in picked]) for shard, picked in calls), return_exceptions=True
        )
        replies: list[bytes] = [b""] * len(submissions)
        failures: dict[int, Exception] = {}
        for (_shard, picked), result in zip(calls, results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):  # cancelled: not a Redis answer to hand out
                    raise result
                failures.update(dict.fromkeys(picked, result))
            else:
                for row, reply in zip(picked, result):
                    replies[row] = reply
        return replies, failures

    async def _call(self, shard: int, submissions: list[Submission]) -> list[bytes]:
        shard_keys, channel = self._keys[shard], self.channels[shard]
        keys: list[str] = [shard_keys.stream]
        args: list = [self._window_ms]
        accepted = shard_keys.accepted_prefix
        for s in submissions:
            probe_key, probe_member = seen_probe(shard_keys, s.transaction_id, s.event_s)
            # Grouped like the worker's markers, by minute of event time: a field per transaction
            # instead of a key with its own expiry, and a retry (same event time) finds its hash.
            keys += (f"{accepted}{bucket_of(s.event_s)}", probe_key)
            args += (s.transaction_id, probe_member, s.payload, channel if s.reply else "", s.fingerprint)
        # Packed by hiredis in one call: redis-py's own packing inspects every argument in Python,
        # which cost ≈ 17 µs per transaction of a 500-transaction batch (six arguments each).
        command = hiredis.pack_command(("EVALSHA", self._sha, len(keys), *keys, *args))
        # Replicated before the requests are answered: an accepted transaction outlives its master.
        try:
            (reply,) = await self._nodes.send(shard_keys.stream, [command], replicated=True)
        except redis.exceptions.NoScriptError:
            # Redis restarted, flushed its scripts, or a replica took over: load it there, once.
            await self._nodes.on_node(shard_keys.stream, lambda node: node.script_load(_ACCEPT))
            (reply,) = await self._nodes.send(shard_keys.stream, [command], replicated=True)
        return reply


def _accepted(reply: bytes) -> Accepted:
    text = reply.decode()
    if text[:1] == "=":
        return Accepted(text[1:] or None, True)
    if text[:1] == "!":
        return Accepted(text[1:], False, conflict=True)
    return Accepted(text, False)
