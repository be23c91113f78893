"""Dead letters written once each, and the ack of a read: durable first, ack last.

A consumer service (alerts, labels) that finds entries it cannot use, or poison split out by the
``StreamConsumer``, writes them to the DLQ stream and acks its read. A repeat after a crash (or an
outage wait) writes no dead letter twice: each carries a marker key (``marker_prefix`` +
marker) in the DLQ stream's slot that lives for ``ttl_s``, written in the same script call as its
letter. On one Redis that call acks the read too, so a crash before it leaves the whole read
pending. On a Redis Cluster the consumed stream hashes to another slot: the letters go first and
are waited for until a replica has them, the ack follows on the consumed stream's node; a crash
in between leaves the read pending, and its repeat finds the markers. The same script serves
letters written without an ack (an empty id list).

The scoring worker settles its reads with its own script (alerts, dead letters and ack at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from redis.cluster import RedisCluster

from ..keys import Keys
from .redis_clients import ReplicaWait, on_node

if TYPE_CHECKING:  # the consumer imports prometheus-client; what only names the DLQ's reasons must not
    from .consumer import Entries, Poison, StreamConsumer

# The DLQ reason of poison (``consumer.Poison``), whichever service split it out.
REASON_MAX_DELIVERIES = "max_deliveries"

SCRIPT = """
-- KEYS[1] the DLQ stream, KEYS[2] the consumed stream (may equal KEYS[1] when nothing is acked)
-- ARGV: group, marker prefix, ttl seconds, source stream, letter count n, then n times (marker,
--       field count f, f field/value pairs), then the ids to ack
local group, prefix, ttl, source, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local i, written = 6, 0
for _ = 1, n do
    local marker, f = ARGV[i], tonumber(ARGV[i + 1])
    local fields = {}
    for k = 1, 2 * f do
        fields[k] = ARGV[i + 1 + k]
    end
    i = i + 2 + 2 * f
    if redis.call('SET', prefix .. marker, '1', 'NX', 'EX', ttl) then
        redis.call('XADD', KEYS[1], '*', 'source_stream', source, unpack(fields))
        written = written + 1
    end
end
local acked = 0
if i <= #ARGV then
    acked = redis.call('XACK', KEYS[2], group, unpack(ARGV, i, #ARGV))
end
return {written, acked}
"""

MARKER_TTL_S = 7 * 86400  # far longer than any redelivery or retry of the same entry
# A dead letter of an entry without ``data`` carries the entry's own fields under this prefix
# (``Entries.kept_fields``); ``fraudd dlq replay`` writes them back unprefixed.
KEPT_FIELD_PREFIX = b"field:"


def kept_field_pairs(fields: dict[bytes, bytes]) -> list[bytes]:
    """An entry's kept fields as flat, prefixed name/value pairs for a dead letter."""
    return [part for name, value in fields.items() for part in (KEPT_FIELD_PREFIX + name, value)]


def restored_fields(letter: dict[bytes, bytes]) -> dict[bytes, bytes] | None:
    """The fields of the entry a dead letter kept (it had no ``data``); None for a letter with a payload."""
    kept = {name[len(KEPT_FIELD_PREFIX) :]: value for name, value in letter.items() if name.startswith(KEPT_FIELD_PREFIX)}
    return kept or None


def marker_prefix(consumed: str, dlq_stream: str) -> str:
    """Where the markers of the dead letters taken from stream ``consumed`` live: in the DLQ stream's
    slot (so on a Redis Cluster a marker is written in one call with its letter), apart per stream."""
    return f"{Keys(dlq_stream, dlq_stream, dlq_stream).dead_prefix}{consumed}:"


@dataclass(slots=True)
class Rejected:
    """A stream entry a service cannot use, with the reason and detail its dead letter records, and
    how often it was delivered (1 unless the read knew: re-read and reclaimed entries)."""

    entry_id: str
    payload: bytes
    reason: str
    detail: str
    deliveries: int = 1
    kept: dict[bytes, bytes] = field(default_factory=dict)  # the fields of an entry without data


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One DLQ entry: ``marker`` identifies it (an entry id, ``<transaction>:<channel>``, ...)."""

    marker: str
    fields: dict[str | bytes, bytes | str | int]


def script_args(
    group: str, marker_prefix: str, source_stream: str, letters: list[DeadLetter], ack_ids: list[str], ttl_s: int = MARKER_TTL_S
) -> list[str | int | bytes]:
    """The script's ARGV; with a sync or asyncio client's ``register_script`` alike. Each letter names
    ``source_stream``, where ``fraudd dlq replay`` puts it back."""
    args: list[str | int | bytes] = [group, marker_prefix, ttl_s, source_stream, len(letters)]
    for letter in letters:
        args += [letter.marker, len(letter.fields)]
        for name, value in letter.fields.items():
            args += [name, value]
    return args + ack_ids


class DeadLetterSettler:
    """Writes the dead letters of ``consumer``'s reads once each and acks the reads (synchronous client)."""

    def __init__(self, consumer: StreamConsumer, dlq_stream: str) -> None:
        self._consumer = consumer
        self._client = consumer.redis
        self._script = self._client.register_script(SCRIPT)
        self._stream = consumer.options.stream
        self._group = consumer.options.group
        self._dlq = dlq_stream
        self._prefix = marker_prefix(self._stream, dlq_stream)
        self._split = isinstance(self._client, RedisCluster)
        self._replicas = ReplicaWait()

    def letter(
        self, entry_id: str, payload: bytes, reason: str, detail: str, deliveries: int, kept: dict[bytes, bytes] | None = None
    ) -> DeadLetter:
        """The dead letter of one entry of the consumed stream (marked by its id); ``kept``: the
        fields of an entry without ``data`` (``Entries.kept_fields``)."""
        fields: dict[str | bytes, bytes | str | int] = {
            "data": payload,
            "reason": reason,
            "detail": detail,
            "source_id": entry_id,
            "consumer": self._consumer.name,
            "deliveries": deliveries,
        }
        for name, value in (kept or {}).items():
            fields[KEPT_FIELD_PREFIX + name] = value
        return DeadLetter(entry_id, fields)

    def poison_letters(self, poison: list[Poison], entries: Entries) -> list[DeadLetter]:
        return [
            self.letter(
                p.entry_id, p.payload, REASON_MAX_DELIVERIES, p.detail, p.deliveries, entries.kept_fields(p.entry_id, p.payload)
            )
            for p in poison
        ]

    def settle(self, ack_ids: list[str], letters: list[DeadLetter]) -> tuple[int, int]:
        """(dead letters written, entries acked); a consumer group lost with Redis's data is created
        again (and nothing is acked: the entries it held went with it)."""
        try:
            return self._settle(ack_ids, letters)
        except redis.ResponseError as exc:
            self._consumer.recreate_lost_group(exc)
            return self._settle(ack_ids, letters)

    def _settle(self, ack_ids: list[str], letters: list[DeadLetter]) -> tuple[int, int]:
        if not self._split:
            written, acked = self._script(
                keys=[self._dlq, self._stream], args=script_args(self._group, self._prefix, self._stream, letters, ack_ids)
            )
            return int(written), int(acked)
        written = 0
        if letters:
            written, _ = self._script(keys=[self._dlq, self._dlq], args=script_args("", self._prefix, self._stream, letters, []))
            self._replicas.wait(self._client, self._dlq)
        if not ack_ids:
            return int(written), 0
        acked = on_node(self._client, self._stream, lambda node: node.xack(self._stream, self._group, *ack_ids))
        return int(written), int(acked)
