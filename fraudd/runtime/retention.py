"""Keeping a stream bounded: trim what every consumer group has acknowledged.

An entry may go once no group still needs it: every group has read past it and none holds it
pending. Entries stay ``--retention-s`` longer than that (to inspect, replay, or let a new group
catch up). Unread or pending entries are never trimmed, whatever their age; backpressure
(``--max-lag``) is what bounds those.
"""

from __future__ import annotations

import time

import redis
from redis.cluster import RedisCluster

from .redis_clients import NO_SUCH_KEY, redis_error_code

# Entries one XTRIM may remove. Approximate trimming without LIMIT stops at 100 stream nodes
# (about 10,000 entries) per call, which a stream fed at 25,000/s outgrows between two
# housekeeping rounds; a bound of our own keeps each call short and the loop finishes the job.
TRIM_STEP = 100_000


def _entry_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def trim_bound(
    client: redis.Redis | RedisCluster, stream: str, retention_s: float, now_s: float | None = None
) -> tuple[int, int] | None:
    """(``client`` decodes responses.) The smallest entry id some group may still need, capped at
    ``retention_s`` ago; None when there is nothing to trim (no group, or nothing read yet)."""
    groups = client.xinfo_groups(stream)
    if not groups:
        return None
    now_s = time.time() if now_s is None else now_s
    bound = (int((now_s - retention_s) * 1000), 0)
    for group in groups:
        bound = min(bound, _entry_id(group["last-delivered-id"]))
        if group["pending"]:
            # Read after the group's record: what was pending then may all be acked by now.
            oldest = client.xpending(stream, group["name"])["min"]
            if oldest is not None:
                bound = min(bound, _entry_id(oldest))
    return bound if bound > (0, 0) else None


def trim_acked(client: redis.Redis | RedisCluster, stream: str, retention_s: float) -> int:
    """Trim entries below ``trim_bound``; returns how many went. Approximate trimming removes
    whole stream nodes only, so it may keep a few more entries, never fewer. It goes in steps of
    at most ``TRIM_STEP`` entries, so no single call holds Redis for long."""
    try:
        bound = trim_bound(client, stream, retention_s)
    except redis.ResponseError as exc:
        if redis_error_code(exc) == NO_SUCH_KEY:
            return 0
        raise
    if bound is None:
        return 0
    trimmed = 0
    while step := client.xtrim(stream, minid=f"{bound[0]}-{bound[1]}", approximate=True, limit=TRIM_STEP):
        trimmed += step
    return trimmed
