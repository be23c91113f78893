"""Confirmed fraud per merchant, device, IP and card: what labels teach the scoring.

A chargeback on a transaction also says something about where it happened: a terminal that was
compromised, a device or an IP address a fraudster uses, a card that was stolen. Once a fraud label
arrives, the transaction's merchant, device, IP and card each count it for 28 days (by the fraudulent
transaction's event time), and every transaction scored afterwards sees, per entity, how many
confirmed frauds it had in the 7 and 28 days before it: the ``CONFIRMED_COLUMNS``, which rules can
test (``merchant_fraud_7d >= 2``) and which models of the second feature contract take as inputs.

Point in time: a transaction only sees a fraud whose label was reported at or before its own event
time, as it would have been scored in real time. Live, a label cannot arrive before it is reported,
so this only bites for late or replayed events; training (``fraudd.learning.history``) applies the
same rule to history, so no label from a row's future ever reaches its features.

State: per kind, one hash ``<prefix>confirmed:<kind>``; field = the entity, value = its confirmed
fraudulent transactions as ``txid=ms@reported_ms`` entries (entries written before reports were kept
read as ``txid=ms``, reported long ago), and ``<prefix>confirmed:version``. Writing is one
script call per batch of labels: idempotent (a transaction is counted once), a verdict turned legit
removes it, pairs older than 28 days before the entity's newest are dropped, a step of a sweep drops
entities whose last confirmed fraud is 28 days old (so the state stays bounded), and the version
moves.
Scorers keep a copy, checked against the version once per batch (one GET) and re-read only when
labels changed it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys

KINDS: tuple[str, ...] = ("merchant", "device", "ip", "card")
DAY_MS = 86_400_000
WINDOWS: tuple[tuple[str, int], ...] = (("7d", 7 * DAY_MS), ("28d", 28 * DAY_MS))
CONFIRMED_COLUMNS: tuple[str, ...] = tuple(f"{kind}_fraud_{name}" for kind in KINDS for name, _ms in WINDOWS)
HORIZON_MS = WINDOWS[-1][1]

# KEYS: the four hashes, their four sweep cursors, then the version. ARGV: horizon, then per label:
# kind index (1-based), entity, transaction id, event ms, reported ms, 1 add / 0 remove. After the labels, a
# step of a sweep drops the entities whose newest confirmed fraud is older than the horizon (by the
# server's clock), so entities never labelled again do not stay forever.
_RECORD = """
local horizon = tonumber(ARGV[1])
for i = 2, #ARGV, 6 do
    local key, entity, txid = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
    local ms, reported_ms, add = tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5] == '1'
    local kept, newest = {}, add and ms or 0
    local current = redis.call('HGET', key, entity)
    if current then
        for id, at, reported in string.gmatch(current, '([^=;]+)=(%d+)@?(%d*)') do
            if id ~= txid then
                kept[#kept + 1] = {id, tonumber(at), reported ~= '' and reported or '0'}
                if tonumber(at) > newest then newest = tonumber(at) end
            end
        end
    end
    if add then kept[#kept + 1] = {txid, ms, reported_ms} end
    local parts = {}
    for _, entry in ipairs(kept) do
        if entry[2] > newest - horizon then
            parts[#parts + 1] = entry[1] .. '=' .. string.format('%d', entry[2]) .. '@' .. entry[3]
        end
    end
    if #parts == 0 then redis.call('HDEL', key, entity) else redis.call('HSET', key, entity, table.concat(parts, ';')) end
end
local clock = redis.call('TIME')
local oldest = tonumber(clock[1]) * 1000 - horizon
for k = 1, 4 do
    local reply = redis.call('HSCAN', KEYS[k], redis.call('GET', KEYS[4 + k]) or '0', 'COUNT', 200)
    local fields = reply[2]
    for j = 1, #fields, 2 do
        local newest = 0
        for at in string.gmatch(fields[j + 1], '=(%d+)') do
            if tonumber(at) > newest then newest = tonumber(at) end
        end
        if newest <= oldest then redis.call('HDEL', KEYS[k], fields[j]) end
    end
    redis.call('SET', KEYS[4 + k], reply[1])
end
return redis.call('INCR', KEYS[9])
"""


class _Unread(enum.Enum):
    """``ConfirmedFraud.counts`` without a version read by the caller (None is a version: the key is absent)."""

    UNREAD = enum.auto()


class ConfirmedFraud:
    """The confirmed-fraud counts of one stream shard's entities.

    Each scorer keeps a copy of the (small) state: entities with a confirmed fraud in the last 28
    days. A version number, bumped by every write, is read once per batch and the copy re-read only
    when it moved, so a batch costs one tiny round trip instead of sending all its merchants,
    devices, IPs and cards to Redis.
    """

    def __init__(self, client: redis.Redis | RedisCluster, keys: Keys) -> None:
        self._redis = client
        self._keys = [f"{keys.prefix}confirmed:{kind}" for kind in KINDS]
        self._sweep_keys = [f"{keys.prefix}confirmed:sweep:{kind}" for kind in KINDS]
        self._version_key = f"{keys.prefix}confirmed:version"
        self._record = client.register_script(_RECORD)
        self._version: bytes | str | None = None  # str only from a client that decodes
        self._state: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in KINDS]

    def record(self, confirmed: list[tuple[str, tuple[str | None, ...], int, int, bool]]) -> None:
        """``(transaction_id, (merchant, device, ip, card), event ms, reported ms, is fraud)`` per
        labelled transaction: fraud is counted once, legit removes an earlier count."""
        args: list[Any] = [HORIZON_MS]
        for txid, entities, ms, reported_ms, fraud in confirmed:
            for k, entity in enumerate(entities, start=1):
                if entity is not None:
                    args += [k, entity, txid, int(ms), int(reported_ms), 1 if fraud else 0]
        if len(args) > 1:
            self._record(keys=[*self._keys, *self._sweep_keys, self._version_key], args=args)

    @property
    def version_key(self) -> str:
        """The key of the version, which a caller may read in a round trip it makes anyway."""
        return self._version_key

    def counts(
        self,
        columns: tuple[Sequence[str | None], ...],
        event_ms: np.ndarray,
        version: bytes | None | Literal[_Unread.UNREAD] = _Unread.UNREAD,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The CONFIRMED_COLUMNS of a batch; ``columns`` are its merchant, device, IP and card.

        ``version``: the value of ``version_key`` as read for this batch (unread: read here);
        ``out``: zeroed columns to count into (a part of a read's: a read's shards count into one)."""
        self._refresh(self._redis.get(self._version_key) if version is _Unread.UNREAD else version)
        n = len(event_ms)
        out = {name: np.zeros(n, dtype=np.float32) for name in CONFIRMED_COLUMNS} if out is None else out
        for kind, column, known in zip(KINDS, columns, self._state):
            if not known:
                continue
            for i, entity in [(i, v) for i, v in enumerate(column) if v is not None and v in known]:
                (times, reported), now = known[entity], event_ms[i]
                for name, span in WINDOWS:
                    out[f"{kind}_fraud_{name}"][i] = np.count_nonzero((times <= now) & (times > now - span) & (reported <= now))
        return out

    def _refresh(self, version: bytes | str | None) -> None:
        if version == self._version:
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._version_key)
        for key in self._keys:
            pipe.hgetall(key)
        version, *hashes = pipe.execute()
        self._state = [{entity.decode(): _entries(blob) for entity, blob in fields.items()} for fields in hashes]
        self._version = version


def _entries(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(event ms, reported ms) of an entity's confirmed frauds."""
    times = [entry.rsplit(b"=", 1)[1].partition(b"@") for entry in blob.split(b";")]
    return (
        np.array([int(at) for at, _sep, _reported in times], dtype=np.int64),
        np.array([int(reported or 0) for _at, _sep, reported in times], dtype=np.int64),
    )
