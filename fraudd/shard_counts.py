"""The shard counts an input stream was scored with, and what another count left behind.

``--shards`` decides which streams hold the input (``keys.shard_streams``) and which shard keeps a
user's state and a transaction's dedup marker (``keys.shard_of``). Changing it moves both, so
``fraudd run`` records its count in Redis (a hash in the base stream's slot: count -> the last
millisecond a supervisor with that count was alive) and the services read the record:

- ``fraudd run`` refuses to start while a stream only another count reads still holds entries the
  group has not finished (``stranded``): nobody would ever read them. ``fraudd status`` shows them.
- ``fraudd ingest`` refuses to start with a count other than the one scoring last ran with
  (``latest``): it would write to streams nobody reads.
- A scoring worker consults the dedup markers another count wrote while they may still be alive
  (``earlier``): a transaction re-sent after the change is still a duplicate (``dedup.CarriedOver``).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from .keys import Keys, shard_streams
from .runtime.groups import group_state


def record_key(stream: str) -> str:
    """The hash of shard count -> last alive (ms), in the base input stream's slot."""
    return Keys(stream, stream, stream).prefix + "shard-counts"


def record(client: redis.Redis | RedisCluster, stream: str, shards: int, now_ms: int) -> None:
    """Note that a supervisor scoring ``stream`` with ``shards`` is alive at ``now_ms``."""
    client.hset(record_key(stream), str(shards), now_ms)


def recorded(client: redis.Redis | RedisCluster, stream: str) -> dict[int, int]:
    """Every count ``stream`` was scored with, and when a supervisor with it was last alive (ms)."""
    return {int(count): int(last) for count, last in client.hgetall(record_key(stream)).items()}


def latest(client: redis.Redis | RedisCluster, stream: str) -> int | None:
    """The count of the supervisor alive most recently; None when scoring never ran."""
    counts = recorded(client, stream)
    return max(counts, key=counts.__getitem__) if counts else None


def earlier(client: redis.Redis | RedisCluster, stream: str, shards: int, since_ms: int) -> list[int]:
    """The other counts whose supervisors were alive at or after ``since_ms``."""
    return sorted(count for count, last in recorded(client, stream).items() if count != shards and last >= since_ms)


@dataclass(frozen=True, slots=True)
class Stranded:
    stream: str
    shards: int  # the count that reads it
    entries: int  # not yet read, or read and not acknowledged, by the group


def stranded(client: redis.Redis | RedisCluster, stream: str, shards: int, group: str) -> list[Stranded]:
    """(``client`` decodes responses.) Streams that only another count reads (the single stream
    counts, recorded or not) and that still hold entries ``group`` has not finished."""
    ours = set(shard_streams(stream, shards))
    found: dict[str, Stranded] = {}
    for count in sorted({1, *recorded(client, stream)} - {shards}):
        for name in shard_streams(stream, count):
            if name in ours or name in found:
                continue
            state = group_state(client, name, group)
            if state.lag + state.pending:
                found[name] = Stranded(name, count, state.lag + state.pending)
    return list(found.values())


def describe(left: list[Stranded], shards: int) -> str:
    """One line: what is stranded, and how to finish it before scoring with ``shards``."""
    where = ", ".join(f"{s.entries} on {s.stream} (--shards {s.shards})" for s in left)
    counts = sorted({s.shards for s in left})
    return (
        f"--shards {shards}: entries no worker of this count reads are not scored yet: {where}; "
        f"score them with --shards {' / '.join(map(str, counts))} until `fraudd status` shows lag 0 there "
        f"(the ingest stopped first), then start with --shards {shards} (README: Changing the shard count)"
    )
