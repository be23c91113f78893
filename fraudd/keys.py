"""Redis key names, shaped for Redis Cluster from day one.

Every key that one batch operation touches carries the hash tag of the input stream it belongs to,
so a shard's streams, dedup markers and per-user feature state live in one slot and a batch
operation never crosses slots. On a single Redis (the default) the tag is just part of the name.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

_HASH_TAG = re.compile(r"\{([^}]+)\}")
# The live blocklists rules can test (`blocklist = "<kind>"`), in the order features.lua takes them.
BLOCKLIST_KINDS: tuple[str, ...] = ("merchant", "device", "ip", "country", "card")


def hash_tag(stream: str) -> str:
    """The tag Redis Cluster hashes for ``stream``: its ``{...}`` part, or the whole name."""
    match = _HASH_TAG.search(stream)
    return match.group(1) if match else stream


def shard_stream(stream: str, shards: int, k: int) -> str:
    """Shard ``k``'s input stream: ``stream`` itself when there is one shard, else ``stream:{k}``."""
    return stream if shards == 1 else f"{stream}:{{{k}}}"


def shard_streams(stream: str, shards: int) -> list[str]:
    """Every shard's input stream, shard 0 first."""
    return [shard_stream(stream, shards, k) for k in range(shards)]


def shard_of(user_id: str, shards: int) -> int:
    """The shard of a user: crc32 of its UTF-8 bytes modulo the shard count (DESIGN.md)."""
    return zlib.crc32(user_id.encode()) % shards


@dataclass(frozen=True, slots=True)
class Keys:
    """The names of one stream shard's keys.

    With the default names (``transactions:raw`` and friends) the derived keys are tagged
    ``{transactions:raw}``, which is the slot of the input stream itself. With ``--shards`` S > 1
    shard k's stream is ``transactions:raw:{k}`` and every derived key of the shard carries its
    tag ``{k}``: on Redis Cluster a shard's stream, markers, states and lease share one slot.
    """

    stream: str
    fraud_stream: str
    dlq_stream: str
    namespace: str = "fraudd"
    # Common prefix of every derived key of this shard (ends with ``:``). A stream named with its
    # own tag (a shard, ``transactions:raw:{3}``) lends its whole name, tag included: keys stay
    # apart per stream name and hash like the stream. An untagged stream is the tag itself. Found
    # once: a read names a shard's keys dozens of times, and the search costs more than the name.
    prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tagged = _HASH_TAG.search(self.stream)
        object.__setattr__(
            self, "prefix", f"{self.namespace}:{self.stream}:" if tagged else f"{self.namespace}:{{{self.stream}}}:"
        )

    @property
    def lease(self) -> str:
        """With shards: ``<epoch>:<owner>`` of the worker that owns this shard, expiring unless renewed."""
        return self.prefix + "lease"

    @property
    def epoch(self) -> str:
        """With shards: the count of leases ever granted on this shard (never expires: fencing tokens grow)."""
        return self.prefix + "epoch"

    @property
    def seen_prefix(self) -> str:
        """``<prefix>seen:<bucket>``: dedup markers, one hash per minute of event time (``scoring/dedup.py``)."""
        return self.prefix + "seen:"

    def seen_bucket(self, bucket: int) -> str:
        """The hash of the transactions counted in event-time bucket ``bucket``: id -> ms offset."""
        return f"{self.seen_prefix}{bucket}"

    @property
    def accepted_prefix(self) -> str:
        """``<prefix>accepted:<event minute>``: hash of transaction_id -> stream id of what the HTTP
        ingest wrote, so a retry is answered as a duplicate before the worker has even read it."""
        return self.prefix + "accepted:"

    def decisions_channel(self, instance: str) -> str:
        """The sharded pub/sub channel on which workers send ingest ``instance`` its decisions."""
        return f"{self.prefix}decisions:{instance}"

    @property
    def signature_prefix(self) -> str:
        """``<prefix>signature:<signature>``: a signed request already served (replays are refused)."""
        return self.prefix + "signature:"

    @property
    def alerted_prefix(self) -> str:
        """``<prefix>alerted:<bucket>``: the set of transaction ids of that event-time bucket already alerted."""
        return self.prefix + "alerted:"

    @property
    def dead_prefix(self) -> str:
        """``<prefix>dead:<bucket>``: the set of entry ids of that bucket (of entry time) already dead-lettered."""
        return self.prefix + "dead:"

    @property
    def rules(self) -> str:
        """``<live version>|<shadow version>`` of the published rule sets (``fraudd/rulesets/pointer.py``):
        one copy per shard, so each worker reads it in its batch's first round trip, on the shard's node."""
        return self.prefix + "rules"

    def blocklist(self, kind: str) -> str:
        """The set of blocked values of ``kind`` (merchant, device, ip, country, card), edited live by operators."""
        return f"{self.prefix}blocklist:{kind}"
