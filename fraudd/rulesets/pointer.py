"""The published rule sets, as every scoring worker sees them: a pointer in Redis, one copy per shard.

The value is ``<live version>|<shadow version>`` (either may be empty). A worker reads its shard's
copy in the first round trip its batch makes anyway (``features.compute_features``) and loads a set from
PostgreSQL only when the pointer moved, so a publish reaches every worker of every supervisor at
its next batch, without a signal or a restart, and each batch is decided by the one version it read.
Each copy carries its shard's hash tag, so on a Redis Cluster it lives on the shard's node.

PostgreSQL is the record (``store.py``); the pointer follows it. ``publish`` is written after the
commit and may simply be written again (``fraudd rules publish`` of the live version re-sends it).
"""

from __future__ import annotations

import psycopg
import redis
from redis.cluster import RedisCluster

from fraudd import shard_counts
from fraudd.keys import Keys, shard_streams

from . import store


def encode(live: int | None, shadow: int | None) -> bytes:
    return f"{'' if live is None else live}|{'' if shadow is None else shadow}".encode()


def decode(value: bytes | None) -> tuple[int | None, int | None] | None:
    """(live, shadow) of a pointer; None when no pointer was ever written (the workers keep what they have)."""
    if not value:
        return None
    live, _, shadow = value.decode().partition("|")
    return (int(live) if live else None, int(shadow) if shadow else None)


def shard_keys(client: redis.Redis | RedisCluster, stream: str, shards: int) -> list[str]:
    """The pointer of every shard of every shard count ``stream`` was ever scored with, and of ``shards``."""
    counts = set(shard_counts.recorded(client, stream)) | {shards}
    return sorted({Keys(s, s, s).rules for count in counts for s in shard_streams(stream, count)})


def publish(client: redis.Redis | RedisCluster, stream: str, shards: int, live: int | None, shadow: int | None) -> int:
    """Point every shard's workers at (live, shadow); returns the number of copies written."""
    value = encode(live, shadow)
    keys = shard_keys(client, stream, shards)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, value)
    pipe.execute()
    return len(keys)


def follow(
    conn: psycopg.Connection, client: redis.Redis | RedisCluster, stream: str, shards: int
) -> tuple[store.RuleSet | None, store.RuleSet | None, int]:
    """Point every shard's workers at the stored live and shadow sets (call it after the commit that
    changed them); returns (live, shadow, copies written)."""
    live, shadow = store.current(conn)
    copies = publish(client, stream, shards, None if live is None else live.version, None if shadow is None else shadow.version)
    return live, shadow, copies
