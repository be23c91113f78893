"""Which input shards this worker reads, and, with ``--shards`` S > 1, owning them by lease.

One shard (the default) is the origin deployment: every worker of every supervisor is a consumer of
the one input stream's group, and the behaviour state is shared under a compare-and-set.

With S > 1 shards each shard has one owner at a time: a worker holds the shard's lease in Redis
(``<epoch>:<owner>``, expiring after ``--lease-ms`` unless renewed), renews it while it makes
progress, and gives it back when it stops. Workers of every supervisor register in one sorted
set with a heartbeat; each aims at its share, taking free shards (their owner gave them back, died,
hung, or lost its host: the lease expired) and giving back the extras, so shards rebalance as
workers come and go. The shares sum to S exactly (S // live, one more for the first S % live
workers by name), so once balanced no worker is short and none polls for more. A worker short of
its share looks again within tens of milliseconds rather than at its next heartbeat: the shard
another worker gives back at its own heartbeat, a moment after this one looked, is taken at once
instead of lying unread until this worker's next heartbeat. A graceful stop leaves the registry with its
leases, so the others' shares grow at their next heartbeat rather than once its heartbeat is a
lease old. A new owner starts from what Redis holds and takes over the entries the previous owner
left pending.

Fencing: the lease value is a token whose epoch grows with every grant, and the calls that write
for a shard (the features commit, a transaction under WATCH of the lease, and the settle script)
check it atomically. A worker also stops writing
for a shard once its own lease deadline passed (its monotonic clock runs on while it is paused, so
a worker SIGSTOPped past its lease finds out before anything else when resumed).

On a Redis Cluster replication is asynchronous: a grant its master took to the grave would come
back as the same epoch from the promoted replica. So a grant counts only once a replica holds it
(``WAIT`` on the grant's own connection); one no replica acknowledged in time is handed back and
tried again later. A master without an online replica is trusted as it is: none can be promoted
in its place with an older epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
from redis.cluster import RedisCluster

from ..keys import Keys, shard_stream
from ..runtime.consumer import Entries, StreamConsumer, ensure_group, observe_read, read_entries
from ..runtime.process import WorkerProcess
from ..runtime.redis_clients import FUNCTION_NOT_FOUND, REDIS_FAILURES, REPLICA_WAIT_MS, on_node, redis_error_code
from .features import LEASE_FUNCTION, FeatureStore, load_library
from .features_owned import OwnedFeatureStore
from .features_shared import SharedFeatureStore
from .leases import Fenced, Lease
from .settings import ScoringSettings
from .sinks import Settler

log = logging.getLogger(__name__)

# A lease is renewed three times per --lease-ms, and trusted locally for 80% of it (the rest covers
# the renewal's round trip and the clocks of two processes).
RENEWALS_PER_LEASE = 3
TRUSTED_SHARE = 0.8
# Renewal runs in a thread, so a batch waiting on a lock or a slow COPY keeps its shards; it stops
# once the batch loop has shown no sign of life for this many leases (a hung worker).
HUNG_AFTER_LEASES = 2
# A worker short of its share looks again this soon, for up to a lease: long enough for every live
# worker to reach its heartbeat and give its extras back; a shard still taken after that waits for
# a lease to run out, which the heartbeat's pace catches as well.
SHORT_RETRY_S = 0.02
# Workers heartbeat at least this often (one pipeline of four commands), so that the shares grow
# soon after a graceful stop: a stopped worker's shards are read by nobody until the others notice.
HEARTBEAT_S = 0.25

_T = TypeVar("_T")


@dataclass(slots=True)
class Shard:
    """What a worker needs to score one shard's batches."""

    index: int
    keys: Keys
    consumer: StreamConsumer
    features: FeatureStore
    settler: Settler
    lease: Lease | None  # None: the single shared stream
    trusted_until: float = math.inf  # time.monotonic() after which this worker must not write for it
    alive_at: float = 0.0  # the batch loop's last sign of life while on this shard

    def check(self) -> None:
        """Raise ``Fenced`` once this worker may no longer write for the shard (and count as a sign
        of life of the batch loop)."""
        self.alive_at = time.monotonic()
        if self.alive_at > self.trusted_until:
            raise Fenced(f"lease on {self.keys.stream} expired while this worker was busy or paused")


class ShardReader:
    """The consumer ``consume()`` reads through: the next batch of this worker's shards.

    ``parts`` are the entries ``read`` returned last, by shard. Once the owned shards have only new
    entries left, one XREADGROUP reads them all (on one Redis, whose streams a single command can
    name): a worker owning several shards scores one batch spanning them instead of a small batch
    per shard in turn, each waiting for the others'.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        settings: ScoringSettings,
        name: str,
        process: WorkerProcess,
        on_outage: Callable[[str], None],
    ) -> None:
        self.redis = client
        self.settings = settings
        self.name = name
        self._process = process
        self._on_outage = on_outage
        # Outage waits outside any shard's batch (leases, start-up) go through this one.
        self.control = StreamConsumer(client, settings.consumer, name, process, on_outage)
        self.owner = f"{name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.shards: dict[int, Shard] = {}
        self.parts: list[tuple[Shard, Entries]] = []
        self._order: list[int] = []
        self._next = 0
        self._next_tick = 0.0
        self._share = 0
        self._short_since: float | None = None  # time.monotonic() this worker found itself short
        self._registry = Keys(settings.consumer.stream, settings.fraud_stream, settings.dlq_stream).prefix + "workers"
        self._alive_at = time.monotonic()
        self._closing = threading.Event()
        self._renewer = threading.Thread(target=self._renew_while_alive, name="leases", daemon=True)

    @property
    def sharded(self) -> bool:
        return self.settings.shards > 1

    @property
    def held(self) -> int:
        return sum(shard.consumer.held for shard in self.shards.values())

    def until_done(self, attempt: Callable[[], _T], component: str) -> _T:
        return self.control.until_done(attempt, component)

    def start(self) -> None:
        """Open the single shared shard, or join the owners of a sharded stream."""
        if not self.sharded:
            self.shards[0] = self._open(0, None)
            self._order = [0]
        else:
            self.until_done(self._rebalance, "redis")
            self._renewer.start()

    def read(self) -> Entries:
        """The next non-empty read (empty after about ``--block-ms`` idle): what a shard reads
        before its new entries, else the new entries of all shards at once (on one Redis), else
        (a Redis Cluster) of the shards in turn."""
        self._alive_at = time.monotonic()
        self.parts = []
        if self.sharded and time.monotonic() >= self._next_tick:
            self.until_done(self._rebalance, "redis")
        if not self._order:  # (a worker short of its share looks again before its block is up)
            time.sleep(max(0.0, min(self.settings.consumer.block_ms / 1000.0, self._next_tick - time.monotonic())))
            return _nothing()
        shards = [self.shards[index] for index in self._order]
        if len(shards) > 1 and not isinstance(self.redis, RedisCluster):
            # What a shard reads before its new entries (taken over, own pending, reclaimed) is read
            # on its own; once none is left, at once the new entries of all: a claim falling due on
            # one shard (every few seconds) does not hold the others' new entries back for a read.
            for shard in shards:
                if not shard.consumer.caught_up and (entries := shard.consumer.read(new=False)):
                    self.parts = [(shard, entries)]
                    return entries
            return self._read_together(shards)
        for _ in range(len(shards)):
            shard = shards[self._next % len(shards)]
            self._next += 1
            entries = shard.consumer.read()
            if entries:
                self.parts = [(shard, entries)]
                return entries
        return _nothing()

    def _read_together(self, shards: list[Shard]) -> Entries:
        """One XREADGROUP of new entries over the shards' streams, up to ``--batch-size`` in all.

        A read that blocked is answered by Redis before 7.2 with the one stream written first,
        even when the same call wrote the others too: the streams missing from the answer are read
        once more at once, without blocking, so what arrived together is scored in one read
        rather than in one read per shard, each waiting for the one before to settle."""
        started = time.perf_counter()
        count = math.ceil(self.settings.consumer.batch_size / len(shards))
        by_stream = self._new_entries(shards, count, block=True)
        missing = [shard for shard in shards if shard.keys.stream not in by_stream]
        if by_stream and missing:
            by_stream.update(self._new_entries(missing, count, block=False))
        for shard in shards:
            if shard.keys.stream in by_stream:
                entries = read_entries(by_stream[shard.keys.stream])
                shard.consumer.hold(entries)
                self.parts.append((shard, entries))
        read = _together(part for _shard, part in self.parts)
        if read:
            observe_read(read, started)
        return read

    def _new_entries(self, shards: list[Shard], count: int, block: bool) -> dict[str, list[Any]]:
        """Stream -> its raw entries, of the streams that had any, in one XREADGROUP of up to
        ``count`` new entries per shard."""
        s = self.settings.consumer
        streams = [shard.keys.stream for shard in shards]
        command = ["XREADGROUP", "GROUP", s.group, self.name, "COUNT", count, *(["BLOCK", s.block_ms] if block else [])]
        command += ["STREAMS", *streams, *[">"] * len(streams)]

        def attempt() -> list[Any]:
            try:
                return cast(list[Any], on_node(self.redis, streams[0], lambda client: client.execute_command(*command)) or [])
            except redis.ResponseError as exc:
                for shard in shards:  # a lost group is recreated (the others exist); a read given up is over
                    shard.consumer.read_failed(exc)
                return []

        return {name.decode(): raw for name, raw in self.until_done(attempt, "redis") if raw}

    def lost(self, shard: Shard, reason: str) -> None:
        """Stop reading ``shard``: its lease is gone; what it held stays pending for the new owner.

        With --pipeline-depth 2 a settle fenced out may report its shard after the lease ran out
        and this worker took the shard again: the new lease is not the one lost."""
        if self.shards.get(shard.index) is not shard:
            return
        log.warning(
            "shard lost, its batch is left to the new owner",
            extra={"event": "shard_lost", "shard": shard.index, "reason": reason},
        )
        self._drop(shard.index)

    def release_all(self) -> None:
        """Leave the registry and give every lease back (graceful stop): the other workers count one
        worker fewer at their next heartbeat and take the shards over at once, instead of keeping
        their old share until this worker's heartbeat is a lease old."""
        self._closing.set()
        if self.sharded:
            try:
                self.redis.zrem(self._registry, self.owner)
            except REDIS_FAILURES:
                pass  # its heartbeat ages out
        for index in list(self.shards):
            shard = self.shards[index]
            if shard.lease is not None:
                try:
                    self._lease("release", shard.keys, shard.lease.token)
                except REDIS_FAILURES:
                    pass  # the lease expires by itself
            self._drop(index)

    # -- leases ----------------------------------------------------------------------------

    def _open(self, index: int, lease: Lease | None) -> Shard:
        s = self.settings
        stream = shard_stream(s.consumer.stream, s.shards, index)
        keys = Keys(stream, s.fraud_stream, s.dlq_stream)
        window_ms = s.dedup_window_s * 1000
        # An owned shard's pending entries belong to owners whose lease expired: all are claimed
        # when the shard is taken (take_over), any read later by a fenced owner once idle for a
        # lease, not the shared stream's --claim-idle-ms.
        # Each shard blocks 1 ms when idle, so one busy shard is not held up by the idle others.
        options = (
            dataclasses.replace(s.consumer, stream=stream, claim_idle_ms=min(s.consumer.claim_idle_ms, s.lease_ms), block_ms=1)
            if lease
            else s.consumer
        )
        consumer = StreamConsumer(self.redis, options, self.name, self._process, self._on_outage, take_over=lease is not None)
        features: FeatureStore
        if lease is None:
            features = SharedFeatureStore(self.redis, keys, window_ms)
        else:
            ensure_group(self.redis, stream, s.consumer.group)
            features = OwnedFeatureStore(self.redis, keys, window_ms, lease)
        return Shard(
            index,
            keys,
            consumer,
            features,
            Settler(self.redis, keys, s.consumer.group, self.name, window_ms, lease),
            lease,
        )

    def _drop(self, index: int) -> None:
        self.shards.pop(index, None)
        self._order = sorted(self.shards)

    def _lease(self, op: str, keys: Keys, who: str, replicated: bool = False) -> Any:
        """The lease function's reply; with ``replicated``, [reply, replicas that acknowledged it]."""
        # Straight to the shard's node: the cluster client would ask a node for FCALL's keys first.
        args = ("FCALL", LEASE_FUNCTION, 2, keys.lease, keys.epoch, op, who, self.settings.lease_ms)

        def send(client: redis.Redis) -> Any:
            if not replicated:
                return client.execute_command(*args)
            # WAIT counts what the connection it arrives on wrote last: one pipeline keeps both on one.
            return client.pipeline(transaction=False).execute_command(*args).execute_command("WAIT", 1, REPLICA_WAIT_MS).execute()

        try:
            return on_node(self.redis, keys.lease, send)
        except redis.ResponseError as exc:
            # A restarted Redis without persistence, or FUNCTION FLUSH, drops the library.
            if redis_error_code(exc) != FUNCTION_NOT_FOUND:
                raise
        load_library(self.redis)
        return on_node(self.redis, keys.lease, send)

    def _acquire(self, keys: Keys) -> str | None:
        """A new lease token on the shard of ``keys``, or None when the shard is taken or, on a
        Redis Cluster, no replica acknowledged the grant in time (it is handed back)."""
        if not isinstance(self.redis, RedisCluster):
            token = self._lease("acquire", keys, self.owner)
        else:
            token, replicas = self._lease("acquire", keys, self.owner, replicated=True)
            if token is not None and replicas == 0 and self._online_replicas(keys) > 0:
                log.warning(
                    "shard lease not replicated in time, handed back",
                    extra={"event": "lease_unreplicated", "stream": keys.stream},
                )
                self._lease("release", keys, token)
                return None
        return token.decode() if isinstance(token, bytes) else token

    def _online_replicas(self, keys: Keys) -> int:
        """Replicas in sync with the shard's master: any of them could be promoted without a grant
        none of them acknowledged (a replica still syncing holds nothing to promote from)."""
        info = on_node(self.redis, keys.lease, lambda client: client.info("replication"))
        return sum(isinstance(v, dict) and v.get("state") == "online" for k, v in info.items() if k.startswith("slave"))

    def _renew_while_alive(self) -> None:
        """The renewal thread: keep this worker's leases while its batch loop shows signs of life."""
        lease_s = self.settings.lease_ms / 1000.0
        while not self._closing.wait(lease_s / RENEWALS_PER_LEASE):
            for shard in list(self.shards.values()):
                started = time.monotonic()
                if shard.lease is None or started - max(self._alive_at, shard.alive_at) > HUNG_AFTER_LEASES * lease_s:
                    continue  # hung: let the lease run out so another worker takes the shard over
                try:
                    held = self._lease("renew", shard.keys, shard.lease.token) == 1
                except REDIS_FAILURES:
                    continue  # Redis away: the lease runs out unless it comes back in time
                shard.trusted_until = started + lease_s * TRUSTED_SHARE if held else -math.inf

    def _rebalance(self) -> None:
        """Drop the shards whose lease ran out, then take free shards or give extras back towards
        this worker's share; when short of it, look again soon."""
        s = self.settings
        started = time.monotonic()
        tick = min(HEARTBEAT_S, s.lease_ms / 1000.0 / RENEWALS_PER_LEASE)
        for shard in list(self.shards.values()):
            if started > shard.trusted_until:
                self.lost(shard, "lease expired")
        live, share = self._heartbeat()
        for index in sorted(self.shards, reverse=True)[: max(0, len(self.shards) - share)]:
            given_back = self.shards[index]
            if given_back.lease is not None:
                self._lease("release", given_back.keys, given_back.lease.token)
            log.info("shard given back", extra={"event": "shard_released", "shard": index, "workers": live})
            self._drop(index)
        first = zlib.crc32(self.owner.encode()) % s.shards
        for step in range(s.shards):
            if len(self.shards) >= share:
                break
            index = (first + step) % s.shards
            if index in self.shards:
                continue
            keys = Keys(shard_stream(s.consumer.stream, s.shards, index), s.fraud_stream, s.dlq_stream)
            token = self._acquire(keys)
            if token is None:
                continue
            lease = Lease(keys.lease, token)
            shard = self._open(index, lease)
            shard.trusted_until = started + s.lease_ms / 1000.0 * TRUSTED_SHARE
            self.shards[index] = shard
            self._order = sorted(self.shards)
            log.info("shard taken", extra={"event": "shard_taken", "shard": index, "lease": lease.token, "workers": live})
        # Short: another worker may give a shard back at its heartbeat any moment, and a shard given
        # back is read by nobody until taken. A share that grew (a worker left) starts a new spell.
        if len(self.shards) >= share:
            self._short_since = None
        elif self._short_since is None or share > self._share:
            self._short_since = started
        self._share = share
        soon = self._short_since is not None and started - self._short_since < s.lease_ms / 1000.0
        self._next_tick = started + (SHORT_RETRY_S if soon else tick)

    def _heartbeat(self) -> tuple[int, int]:
        """Renew this worker's entry in the registry; the live workers and this worker's share.

        Shares go by rank of name among the live workers, so workers that read the same registry
        agree on shares summing to S: one that read it a moment before a worker joined or left
        disagrees until its next heartbeat, a short spell of polling at most."""
        s = self.settings
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self._registry, {self.owner: now_ms})
        pipe.zremrangebyscore(self._registry, "-inf", now_ms - s.lease_ms)
        pipe.pexpire(self._registry, 10 * s.lease_ms)
        pipe.zrange(self._registry, 0, -1)
        members = sorted(pipe.execute()[-1])
        rank = members.index(self.owner.encode())
        return len(members), s.shards // len(members) + (rank < s.shards % len(members))


def _nothing() -> Entries:
    return Entries([], [], set(), {}, {})


def _together(parts: Iterable[Entries]) -> Entries:
    """One read's entries of several shards as one (what the runtime counts and logs)."""
    together = _nothing()
    for entries in parts:
        together.ids += entries.ids
        together.payloads += entries.payloads
    return together
