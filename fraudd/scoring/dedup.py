"""Dedup markers: which transactions were already counted, grouped by event-time bucket.

A marker per transaction as a key of its own (``SET NX PX``) costs ≈ 180 bytes and ≈ 4 µs of
Redis per transaction; markers grouped in one hash per minute of event time (per shard) cost
≈ 80 bytes and ≈ 1 µs, checked and added for a whole batch with one HMGET and one HSET per
bucket. A duplicate — a redelivered entry, or a producer resending the message — carries the
transaction's own timestamp, so it lands in its original's bucket. A field's value is the
original's millisecond offset in the bucket, so a resend stamped a little differently (but in the
same minute) is still recognised and scored at its original's event time.

A bucket expires ``--dedup-window-s`` after its last addition: every marker lives at least the
window, and at most the window plus the span of event time its bucket kept receiving (a minute,
plus how late the latest events of that minute arrived).

``was_seen`` is the question other services ask ("was this transaction already scored?") without
knowing this layout; a script that must ask inside Redis, atomically with its own writes (the
HTTP ingest's), passes the keys ``seen_probe`` names and calls ``SEEN_PROBE_LUA``'s ``counted``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis
from redis.cluster import RedisCluster

from ..keys import Keys, shard_of, shard_stream

if TYPE_CHECKING:  # the batches come as numpy arrays; `fraudd status`'s estimate and the ingest's probe import no numpy
    import numpy as np

BUCKET_MS = 60_000
# Redis memory per marker with its share of the bucket's hash table, measured as used_memory growth
# over 300,000 transactions with 14-character ids (README: "Behaviour features and their memory").
MARKER_BYTES = 70


def buckets(event_times_ms: np.ndarray) -> np.ndarray:
    """The bucket number of each event time (floor division: events before 1970 are valid too)."""
    return event_times_ms // BUCKET_MS


def entry_bucket(entry_id: str) -> int:
    """The bucket of a stream entry id's millisecond part (dead-letter markers are per entry)."""
    return int(entry_id[: entry_id.index("-")]) // BUCKET_MS


def bucket_of(timestamp: float) -> int:
    """The bucket of one timestamp (Unix seconds), rounded to the millisecond half to even as numpy rounds."""
    return round(timestamp * 1000.0) // BUCKET_MS


SEEN_PROBE_LUA = "local function counted(key, member) return redis.call('HEXISTS', key, member) == 1 end"


def seen_probe(keys: Keys, transaction_id: str, timestamp: float) -> tuple[str, str]:
    """(key, member) for ``counted`` in ``SEEN_PROBE_LUA``: was the transaction already counted?"""
    return keys.seen_bucket(bucket_of(timestamp)), transaction_id


def projected_marker_bytes(rate_per_s: float, window_s: float) -> float:
    """Redis memory the markers settle at for ``rate_per_s`` transactions and a ``window_s`` window
    (plus the minute a bucket keeps receiving)."""
    return rate_per_s * (window_s + BUCKET_MS / 1000) * MARKER_BYTES


def was_seen(client: redis.Redis, keys: Keys, transaction_ids: Sequence[str], timestamps: Sequence[float]) -> list[bool]:
    """Whether each transaction (id and the message's ``timestamp`` in Unix seconds) was already
    counted by a worker within the dedup window: one HMGET per event-time bucket, in one pipeline.

    A transaction a worker is scoring right now is not seen yet: this answers "already scored",
    not "being scored".
    """
    if not transaction_ids:
        return []
    rows_of: dict[int, list[int]] = {}
    for row, bucket in enumerate(map(bucket_of, timestamps)):
        rows_of.setdefault(bucket, []).append(row)
    pipe = client.pipeline(transaction=False)
    for bucket, rows in rows_of.items():
        pipe.hmget(keys.seen_bucket(bucket), [transaction_ids[r] for r in rows])
    seen = [False] * len(transaction_ids)
    for rows, values in zip(rows_of.values(), pipe.execute()):
        for row, value in zip(rows, values):
            seen[row] = value is not None
    return seen


class CarriedOver:
    """The dedup markers written under earlier shard counts (``shard_counts.earlier``), adopted by
    the current shard while they may still be alive.

    A marker lives in its shard's keys, and ``--shards`` decides the shard: after a change, a
    transaction re-sent within the window finds no marker where its new shard looks. Before a
    batch's features, ``adopt`` looks each transaction up where each earlier count kept it and
    copies what it finds into this shard's bucket (same id, same offset), so the features treat it
    as seen: scored once, stored once, alerted once. One pipelined round trip per batch, only
    while an earlier count's markers may live (its last alive time plus the window and the minute
    a bucket keeps receiving); nothing at all on a deployment that never changed its count.
    """

    def __init__(self, stream: str, earlier: dict[int, int], window_ms: int) -> None:
        """``stream``: the base input stream; ``earlier``: count -> last alive (ms) of each earlier count."""
        self._stream = stream
        self._window_ms = window_ms
        self._until_ms = {count: last + window_ms + 2 * BUCKET_MS for count, last in earlier.items()}

    def adopt(
        self,
        client: redis.Redis | RedisCluster,
        keys: Keys,
        transaction_ids: Sequence[str],
        user_ids: Sequence[str],
        timestamps: np.ndarray,
        now_ms: int,
    ) -> int:
        """Copy the earlier counts' markers of these transactions into ``keys``' buckets; returns how many.
        (A loop per transaction, but only in the hour or so after a change of the count.)"""
        counts = [count for count, until in self._until_ms.items() if until > now_ms]
        if not counts or not transaction_ids:
            return 0
        row_buckets = [bucket_of(timestamp) for timestamp in timestamps.tolist()]
        lookups: dict[str, list[int]] = {}
        for count in counts:
            for row, (user, bucket) in enumerate(zip(user_ids, row_buckets)):
                shard = Keys(shard_stream(self._stream, count, shard_of(user, count)), "", "")
                lookups.setdefault(shard.seen_bucket(bucket), []).append(row)
        pipe = client.pipeline(transaction=False)
        for key, rows in lookups.items():
            pipe.hmget(key, [transaction_ids[r] for r in rows])
        found: dict[int, bytes] = {}
        for rows, offsets in zip(lookups.values(), pipe.execute()):
            for row, offset in zip(rows, offsets):
                if offset is not None:
                    found.setdefault(row, offset)
        if not found:
            return 0
        pipe = client.pipeline(transaction=False)
        for row, offset in found.items():
            key = keys.seen_bucket(row_buckets[row])
            pipe.hsetnx(key, transaction_ids[row], offset)
            # As the features' own additions do: the bucket lives the window after its last addition.
            pipe.pexpire(key, self._window_ms)
        pipe.execute()
        return len(found)
