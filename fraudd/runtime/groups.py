"""A consumer group's state on a stream, as Redis reports it: lag, pending, consumers.

Read by the supervisor's housekeeping (gauges, gone consumers), ``fraudd status``, the ingest's
back-pressure and the shard-count checks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import NEVER_DECODE
from redis.cluster import RedisCluster

from .redis_clients import NO_SUCH_KEY, redis_error_code


@dataclass(frozen=True, slots=True)
class GroupState:
    lag: int
    pending: int
    oldest_pending_age_s: float
    consumers: list[dict[str, Any]]
    entries_read: int | None = None  # delivered to the group since it was created; None: Redis cannot tell


def group_state(client: redis.Redis | RedisCluster, stream: str, group: str) -> GroupState:
    """(``client`` decodes responses.) Lag, pending count and oldest pending age of ``group`` (computing
    lag when Redis has none); a stream nothing was written to yet has neither."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError as exc:
        if redis_error_code(exc) != NO_SUCH_KEY:
            raise
        return GroupState(0, 0, 0.0, [])
    info = next((g for g in groups if g["name"] == group), None)
    if info is None:
        return GroupState(client.xlen(stream), 0, 0.0, [])
    lag = info.get("lag")
    if lag is None:
        # Redis reports no lag after deletions or trimming; count what lies past the last delivery.
        # Undecoded: a decoding client would choke on a payload that is not UTF-8 (it is dead-lettered).
        lag = len(
            client.execute_command(  # type: ignore[no-untyped-call]  # redis-py's, unannotated on RedisCluster
                "XRANGE", stream, f"({info['last-delivered-id']}", "+", "COUNT", 100_000, keys=[stream], **{NEVER_DECODE: True}
            )
        )
    summary = client.xpending(stream, group)
    oldest = 0.0
    if summary["pending"]:
        oldest = max(0.0, time.time() - int(summary["min"].split("-")[0]) / 1000.0)
    entries_read = info.get("entries-read")
    return GroupState(
        int(lag),
        int(info["pending"]),
        oldest,
        client.xinfo_consumers(stream, group),
        None if entries_read is None else int(entries_read),
    )


def combined(states: list[GroupState]) -> GroupState:
    """The group over every input shard: lags and pending summed, the oldest pending of all."""
    if len(states) == 1:
        return states[0]
    reads = [state.entries_read for state in states if state.entries_read is not None]
    return GroupState(
        sum(state.lag for state in states),
        sum(state.pending for state in states),
        max(state.oldest_pending_age_s for state in states),
        [consumer for state in states for consumer in state.consumers],
        sum(reads) if len(reads) == len(states) else None,
    )
