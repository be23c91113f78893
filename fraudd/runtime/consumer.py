"""The stream consumer every fraudd service reads with, and the loop around its batches.

A service is a ``BatchHandler``, a small "what to do with a batch"; this module does the rest, the
same way for scoring, alerts and labels:

    read      own pending entries first (a respawned worker finishes what its previous life read
              but never acked; a new owner of a leased shard first claims everything pending, so
              it takes over in stream order), then entries idle too long at other consumers
              (XAUTOCLAIM: their worker died or hung), then new entries (XREADGROUP COUNT ... BLOCK ...)
    poison    entries delivered more than ``max_deliveries`` times are split out for the DLQ
    outages   an unreachable Redis or PostgreSQL is waited out with bounded, jittered back-off
              while the batch in flight stays claimed; nothing new is read meanwhile
    stop      SIGTERM lets the batch in flight settle; a batch that cannot settle before the
              grace period ends stays pending for the next worker

The client's stream replies stay raw (RESP2, undecoded): decoding ids and payloads per batch is
cheaper than redis-py's per-entry dicts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
import redis
from redis.cluster import RedisCluster

from ..settings import ConsumerSettings
from . import metrics
from .process import BootError, WorkerProcess
from .redis_clients import REDIS_FAILURES, on_node, redis_error_code

log = logging.getLogger(__name__)

_BACKOFF_FIRST_S = 0.05
# At most a second between attempts: after a Redis Cluster failover the first attempt that meets
# the new slot map must come within a /v1/score decision timeout, and one call a second per
# worker costs a recovering server nothing.
_BACKOFF_MAX_S = 1.0

# Errors that mean "a dependency is away", not "this batch is bad": the batch is retried as is.
# A Redis at maxmemory (noeviction) refuses writes until memory is freed (markers expire, the
# stream is trimmed) or raised: an outage like any other, never a reason to dead-letter a batch.
# On a Redis Cluster, a failed master's slots answer CLUSTERDOWN (or TRYAGAIN, MASTERDOWN) until a
# replica takes over, and MOVED/ASK reach the per-node path of the features code while the slot
# map changes: the same wait, then a retry on the new map. With no node of the cluster reachable,
# redis-py raises RedisClusterUnreachableError, outside redis.RedisError: an outage all the same.
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterUnreachableError,
)
POSTGRES_DOWN = (
    psycopg.OperationalError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.InsufficientPrivilege,
)
# The reply to a blocked XREADGROUP whose node stopped serving the stream meanwhile (``read_failed``).
UNBLOCKED = "UNBLOCKED"
_T = TypeVar("_T")


class Stopping(Exception):
    """Shutdown was requested while the current batch could not be settled; it stays pending."""


@dataclass(slots=True)
class Entries:
    """One read, as parallel lists: a batch costs a few comprehensions, not an object per entry."""

    ids: list[str]
    payloads: list[bytes | None]  # the ``data`` field; None: the entry has none or was deleted
    deleted: set[str]  # trimmed or XDEL'd while pending: nothing to process, only to ack
    deliveries: dict[str, int]  # known only for re-read and reclaimed entries; 1 for the rest
    extra: dict[str, dict[bytes, bytes]]  # fields besides ``data``, of the entries that have any

    def __len__(self) -> int:
        return len(self.ids)

    def kept_fields(self, entry_id: str, payload: bytes | None) -> dict[bytes, bytes]:
        """What a dead letter of an entry without ``data`` keeps of it (``payload`` empty or None):
        its fields, so a replay puts the entry back as it was rather than as an empty payload."""
        return {} if payload else self.extra.get(entry_id, {})


@dataclass(frozen=True, slots=True)
class Poison:
    """An entry delivered more than ``max_deliveries`` times: it goes to the DLQ, not through again."""

    entry_id: str
    payload: bytes
    deliveries: int

    @property
    def detail(self) -> str:
        return f"delivered {self.deliveries} times"


def read_entries(raw_entries: list[Any], deliveries: dict[str, int] | None = None) -> Entries:
    """Entries from a raw (RESP2, undecoded) XREADGROUP/XAUTOCLAIM reply."""
    ids = [entry_id.decode() for entry_id, _fields in raw_entries]
    # The origin producer writes exactly one field, ``data``: look further only when it did not.
    payloads = [fields[1] if fields and fields[0] == b"data" else _data_field(fields) for _id, fields in raw_entries]
    extra = {
        i: _extra_fields(fields)
        for i, (_id, fields) in zip(ids, raw_entries)
        if fields and (len(fields) > 2 or fields[0] != b"data")
    }
    deleted = {i for i, (_id, fields) in zip(ids, raw_entries) if fields is None} if deliveries is not None else set()
    return Entries(ids, payloads, deleted, deliveries or {}, extra)


def _data_field(fields: list[bytes] | None) -> bytes | None:
    if not fields:
        return None
    return dict(zip(fields[::2], fields[1::2])).get(b"data")


def _extra_fields(fields: list[bytes]) -> dict[bytes, bytes]:
    return {name: value for name, value in zip(fields[::2], fields[1::2]) if name != b"data"}


def observe_read(entries: Entries, started: float) -> None:
    """The metrics of one read that began at ``started`` (``perf_counter``): its time and its size,
    once per read, however many streams it spans, like every other stage of a batch."""
    metrics.stage_duration.labels("read").observe(time.perf_counter() - started)
    metrics.batch_size.observe(len(entries))


class StreamConsumer:
    """Consumer ``name`` of ``options.group`` on ``options.stream``, in worker process ``process``.

    ``on_outage(kind)`` is told of every failed attempt while Redis (``"redis"``) or PostgreSQL
    (``"postgres"``) is away, so the handler can drop a broken connection before the next one.

    ``take_over``: this consumer alone may write for the stream from now on (it holds the shard's
    lease, whose fencing shuts the previous owner out), so everything pending is claimed at once,
    before the first read, instead of once idle for ``claim_idle_ms``.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        options: ConsumerSettings,
        name: str,
        process: WorkerProcess,
        on_outage: Callable[[str], None] | None = None,
        take_over: bool = False,
    ) -> None:
        self.redis = client
        self.options = options
        self.name = name
        self.process = process
        self._on_outage = on_outage
        self._own_pending_cursor: str | None = "0"
        self._take_over = take_over
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        # Reads not yet acked, kept claimed while an outage is waited out. Two at most: one being
        # prepared, one settling in a handler's thread.
        self._held: list[list[str]] = []

    # -- reading ---------------------------------------------------------------------------

    def read(self, new: bool = True) -> Entries:
        """The next batch (possibly empty after ``block_ms``); held until ``release``d. With
        ``new=False`` only what comes before the new entries (taken over, own pending, reclaimed):
        empty, at once, when nothing is."""
        started = time.perf_counter()
        entries = self.until_done(lambda: self._next_entries(new), "redis")
        if entries:
            self.hold(entries)
            observe_read(entries, started)
        return entries

    def hold(self, entries: Entries) -> None:
        """``entries``, read from this consumer's stream (here or in a read of several streams),
        are held until ``release``d."""
        self._held.append(entries.ids)

    @property
    def caught_up(self) -> bool:
        """Only new entries are left to read: nothing to take over, no own pending entry, no claim
        due. Until then ``read`` serves those first."""
        return not self._take_over and self._own_pending_cursor is None and time.monotonic() < self._next_claim

    def release(self, entries: Entries) -> None:
        """``entries`` are acked (or will be by nobody else): stop keeping them claimed."""
        self._held = [ids for ids in self._held if ids is not entries.ids]

    @property
    def held(self) -> int:
        return sum(len(ids) for ids in self._held)

    def split_poison(self, entries: Entries) -> tuple[Entries, list[Poison]]:
        """(what to process, what to dead-letter as poison); deleted entries are in neither, only acked."""
        deliveries = entries.deliveries
        if not deliveries and not entries.deleted:
            return entries, []
        limit = self.options.max_deliveries
        poison = [
            Poison(i, p or b"", deliveries[i])
            for i, p in zip(entries.ids, entries.payloads)
            if deliveries.get(i, 1) > limit and i not in entries.deleted
        ]
        keep = [
            (i, p) for i, p in zip(entries.ids, entries.payloads) if deliveries.get(i, 1) <= limit and i not in entries.deleted
        ]
        ids = [i for i, _p in keep]
        return Entries(
            ids, [p for _i, p in keep], set(), deliveries, {i: entries.extra[i] for i in ids if i in entries.extra}
        ), poison

    def _next_entries(self, new: bool) -> Entries:
        if self._take_over:
            self._claim_all_pending()
        if self._own_pending_cursor is not None:
            reply = self._xreadgroup(self._own_pending_cursor, block=False)
            if reply:
                self._own_pending_cursor = reply[-1][0].decode()
                return read_entries(reply, self._deliveries(reply))
            self._own_pending_cursor = None
        if time.monotonic() >= self._next_claim:
            entries = self._claim()
            if entries:
                return entries
        return read_entries(self._xreadgroup(">", block=True) if new else [])

    def _xreadgroup(self, start: str, block: bool) -> list[Any]:
        o = self.options
        args = ["GROUP", o.group, self.name, "COUNT", o.batch_size]
        if block:
            args += ["BLOCK", o.block_ms]
        try:
            reply = self._command("XREADGROUP", *args, "STREAMS", o.stream, start)
        except redis.ResponseError as exc:
            self.read_failed(exc)
            return []
        return reply[0][1] if reply else []

    def _command(self, *args: Any) -> Any:
        """A command on the stream, its reply raw (``connect_redis``: nested lists of bytes), on the
        node serving it."""
        return on_node(self.redis, self.options.stream, lambda client: client.execute_command(*args))

    def _pending_command(self, *args: Any) -> Any:
        """``_command`` for XAUTOCLAIM and XPENDING. A group lost with Redis's data, or with a master
        that failed over before its replica had the XGROUP CREATE (the shard's lease, waited for
        until a replica held it, survives), is recreated, with nothing pending, and the command
        sent again."""
        try:
            return self._command(*args)
        except redis.ResponseError as exc:
            self.recreate_lost_group(exc)
        return self._command(*args)

    def read_failed(self, exc: redis.ResponseError) -> None:
        """After an error reply to XREADGROUP, which read nothing: a lost group is recreated, and a
        blocked read that the node gave up (``UNBLOCKED``: the stream's key left it, moved to another
        node by a reshard or deleted, or the node turned replica) is over; the next read finds where
        the stream went (a redirection, waited out as an outage). Anything else is raised."""
        if redis_error_code(exc) != UNBLOCKED:
            self.recreate_lost_group(exc)

    def recreate_lost_group(self, exc: redis.ResponseError) -> None:
        """Re-raise ``exc`` unless it says the consumer group is gone; then recreate the group.

        The group vanishes when Redis loses its data, and the entries read from it with it: the
        service goes on with what arrives next instead of stopping.
        """
        if redis_error_code(exc) != "NOGROUP":
            raise exc
        log.error("consumer group missing, recreating it", extra={"event": "group_recreated"})
        ensure_group(self.redis, self.options.stream, self.options.group)

    def _claim_all_pending(self) -> None:
        """Make every pending entry ours (JUSTID: no delivery counted, so a handover never pushes an
        entry towards poison); the own-pending read that follows then takes them in stream order."""
        o = self.options
        cursor, claimed = b"0-0", 0
        while True:
            cursor, ids, *_deleted = self._pending_command(
                "XAUTOCLAIM", o.stream, o.group, self.name, 0, cursor, "COUNT", 1000, "JUSTID"
            )
            claimed += len(ids)
            if cursor == b"0-0":
                break
        self._take_over = False
        if claimed:
            metrics.reclaimed.inc(claimed)
            log.info("took over pending entries", extra={"event": "reclaimed", "entries": claimed, "stream": o.stream})

    def _claim(self) -> Entries | None:
        """Take over entries idle for longer than ``claim_idle_ms`` (their consumer died or hung)."""
        o = self.options
        cursor, raw, _deleted = self._pending_command(
            "XAUTOCLAIM", o.stream, o.group, self.name, o.claim_idle_ms, self._claim_cursor, "COUNT", o.batch_size
        )
        self._claim_cursor = cursor.decode()
        if self._claim_cursor == "0-0":
            # A full pass over the pending list is done; the next one can wait a while.
            self._next_claim = time.monotonic() + o.claim_idle_ms / 2000.0
        raw = [item for item in raw if item]
        if not raw:
            return None
        metrics.reclaimed.inc(len(raw))
        log.info("reclaimed pending entries", extra={"event": "reclaimed", "entries": len(raw)})
        return read_entries(raw, self._deliveries(raw))

    def _deliveries(self, raw: list[Any]) -> dict[str, int]:
        """Delivery counts of entries this consumer holds, for the poison check."""
        first, last = raw[0][0], raw[-1][0]
        pending = self._pending_command("XPENDING", self.options.stream, self.options.group, first, last, len(raw), self.name)
        return {entry_id.decode(): int(count) for entry_id, _consumer, _idle, count in pending}

    # -- waiting out outages ---------------------------------------------------------------

    def until_done(self, attempt: Callable[[], _T], component: str) -> _T:
        """Run ``attempt`` until it succeeds, waiting out Redis/PostgreSQL outages with back-off.

        While waiting, the batches in flight are kept claimed (their idle time reset) so that no
        other worker takes over a batch this live worker is still responsible for. Told to stop
        during a long outage, it gives up with ``Stopping`` and the batch stays pending.
        """
        delay = _BACKOFF_FIRST_S
        down_since = None
        while True:
            try:
                result = attempt()
            except REDIS_DOWN + POSTGRES_DOWN as exc:
                # Waiting out an outage is progress: restarting the service would not end it.
                self.process.heartbeat()
                kind = "redis" if isinstance(exc, REDIS_DOWN) else "postgres"
                metrics.errors.labels(kind, type(exc).__name__).inc()
                full = isinstance(exc, redis.exceptions.OutOfMemoryError)
                metrics.redis_out_of_memory.set(int(full))
                if self._on_outage is not None:
                    self._on_outage(kind)
                if down_since is None:
                    down_since = time.monotonic()
                    log.error(
                        f"{kind} {'out of memory' if full else 'unavailable'}, retrying",
                        extra={"event": "outage", "component": kind, "error": str(exc), "error_type": type(exc).__name__},
                    )
                if self.process.stopping and time.monotonic() - down_since > self.options.shutdown_timeout_s / 2:
                    raise Stopping() from exc
                self._wait_keeping_claimed(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            if down_since is not None:
                metrics.redis_out_of_memory.set(0)
                log.info(
                    f"{component} back",
                    extra={"event": "recovered", "component": component, "down_s": round(time.monotonic() - down_since, 3)},
                )
            return result

    def _wait_keeping_claimed(self, seconds: float) -> None:
        """Sleep ``seconds``, refreshing the claim on the batches in flight at least three times per
        ``claim_idle_ms``: a back-off step may be longer than that, and a claim left to go idle
        would let another worker take over (and redo) a batch this one still holds."""
        deadline = time.monotonic() + seconds
        step = self.options.claim_idle_ms / 3000.0
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(step, left))
            self._keep_claimed()

    def _keep_claimed(self) -> None:
        in_flight = [i for ids in list(self._held) for i in ids]
        if not in_flight:
            return
        try:
            self._command("XCLAIM", self.options.stream, self.options.group, self.name, 0, *in_flight, "JUSTID")
        except REDIS_FAILURES:
            # Best effort: Redis is still away, or lost the group with these entries (the read or
            # the settle that is waiting recreates it).
            pass


class Reader(Protocol):
    """What ``consume`` reads from: a ``StreamConsumer``, or a reader over several (the scoring
    worker's owned shards)."""

    @property
    def name(self) -> str: ...

    @property
    def held(self) -> int:
        """Entries read and not yet acked."""

    def read(self) -> Entries:
        """The next batch, possibly empty."""


class BatchHandler(Protocol):
    """What a service does with a batch; ``consume`` calls these in this order."""

    def boot(self) -> None:
        """Load configuration and connect; raise ``BootError`` when respawning would not help."""

    def reload(self) -> None:
        """Re-read configuration at a batch boundary (SIGHUP); keep the old one if the new is bad."""

    def process(self, entries: Entries) -> None:
        """Handle one read; ``consumer.release(entries)`` once it is acked."""

    def drain(self) -> None:
        """Finish whatever is still settling (graceful stop)."""

    def close(self) -> None:
        """Release connections."""


def consume(process: WorkerProcess, consumer: Reader, handler: BatchHandler) -> int:
    """The life of a consumer worker process; returns its exit code."""
    process.install_signals()
    try:
        handler.boot()
    except BootError as exc:
        log.error("worker cannot start", extra={"event": "boot_error", "reason": str(exc)})
        return process.boot_failed(str(exc))
    except Stopping:
        # Told to stop while still waiting for a dependency to boot: nothing was read yet.
        log.warning("stopped before start-up completed", extra={"event": "stopped_booting"})
        return 0
    process.ready()
    log.info("worker started", extra={"event": "worker_started", "consumer": consumer.name})
    metrics.workers_alive.set(1)
    try:
        while process.running:
            process.heartbeat()
            if process.reload_requested:
                process.reload_requested = False
                handler.reload()
                process.ready()
            entries = consumer.read()
            if entries:
                handler.process(entries)
        handler.drain()
    except Stopping:
        log.warning(
            "stopped with a batch unsettled; it stays pending for the next worker",
            extra={"event": "stopped_unsettled", "entries": consumer.held},
        )
    finally:
        handler.close()
    log.info("worker stopped", extra={"event": "worker_stopped", "consumer": consumer.name})
    return 0


def ensure_group(client: redis.Redis | RedisCluster, stream: str, group: str, start: str = "0") -> bool:
    """Create the consumer group if missing, reading from ``start`` (``0``: the stream's beginning,
    ``$``: what arrives next); True if it was created."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if redis_error_code(exc) == "BUSYGROUP":
            return False
        raise
    return True
