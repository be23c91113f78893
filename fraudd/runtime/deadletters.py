"""Dead letters written once each, and the ack of a read, in one atomic Redis call.

A consumer service (alerts, labels) that finds entries it cannot use, or poison split out by the
``StreamConsumer``, writes them to the DLQ stream and acks its read. Done as one script, a crash
before it leaves the whole read pending, and a repeat after a crash (or an outage wait) writes
no dead letter twice: each carries a marker key (``<marker prefix><marker>``) that lives for
``ttl_s``. The same script serves letters written without an ack (an empty id list).

The scoring worker settles its reads with its own script (alerts, dead letters and ack at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

SCRIPT = """
-- KEYS[1] the DLQ stream, KEYS[2] the consumed stream (may equal KEYS[1] when nothing is acked)
-- ARGV: group, marker prefix, ttl seconds, letter count n, then n times (marker, field count f,
--       f field/value pairs), then the ids to ack
local group, prefix, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local i, written = 5, 0
for _ = 1, n do
    local marker, f = ARGV[i], tonumber(ARGV[i + 1])
    local fields = {}
    for k = 1, 2 * f do
        fields[k] = ARGV[i + 1 + k]
    end
    i = i + 2 + 2 * f
    if redis.call('SET', prefix .. marker, '1', 'NX', 'EX', ttl) then
        redis.call('XADD', KEYS[1], '*', unpack(fields))
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


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One DLQ entry: ``marker`` identifies it (an entry id, ``<transaction>:<channel>``, ...)."""

    marker: str
    fields: dict[str, bytes | str | int]


def script_args(group: str, marker_prefix: str, letters: list[DeadLetter], ack_ids: list[str],
                ttl_s: int = MARKER_TTL_S) -> list:
    """The script's ARGV; with a sync or asyncio client's ``register_script`` alike."""
    args: list = [group, marker_prefix, ttl_s, len(letters)]
    for letter in letters:
        args += [letter.marker, len(letter.fields)]
        for name, value in letter.fields.items():
            args += [name, value]
    return args + ack_ids


class DeadLetterSettler:
    """Writes a read's dead letters once each and acks the read, atomically (synchronous client)."""

    def __init__(self, client: redis.Redis, stream: str, group: str, dlq_stream: str, marker_prefix: str) -> None:
        self._script = client.register_script(SCRIPT)
        self._keys = [dlq_stream, stream]
        self._group = group
        self._prefix = marker_prefix

    def settle(self, ack_ids: list[str], letters: list[DeadLetter]) -> tuple[int, int]:
        """(dead letters written, entries acked)."""
        written, acked = self._script(keys=self._keys, args=script_args(self._group, self._prefix, letters, ack_ids))
        return int(written), int(acked)
