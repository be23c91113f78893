"""Model input features for a whole batch: message columns and behaviour, both with numpy.

Behaviour state must count each transaction once however often it is delivered, so it lives in
Redis with a dedup marker per counted transaction (``dedup.py``); but Redis is the one
single-threaded process all workers share, so it only stores it: the arithmetic runs in the
worker (``behaviour.py``). Two stores keep it, behind one interface (``FeatureStore``):

- ``SharedFeatureStore`` (``features_shared.py``): every worker may write any user (one shard, the
  default), so per batch one read of the users' states and one atomic commit that writes each
  state only if it is unchanged since the read (compare-and-set), with its markers.
- ``OwnedFeatureStore`` (``features_owned.py``): one worker owns the shard through a lease
  (``--shards`` > 1), keeps its users' states in memory, and writes once per batch, fenced by the
  lease.

This module holds what both share: the columns, the batch prepared for the arithmetic, the
markers grouped by bucket, the calls to the shard's Redis and the assembly of ``Features``.
Training computes features through ``SharedFeatureStore.compute`` on a scratch key prefix, so
offline features are the live ones.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_not
from typing import Any, Protocol, cast

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import BLOCKLIST_KINDS, Keys
from fraudd.runtime.redis_clients import FUNCTION_NOT_FOUND, on_node, redis_error_code
from fraudd.runtime.redis_wire import Command, HeldConnection, Outgoing
from fraudd.scoring import behaviour, dedup
from fraudd.scoring.behaviour import BEHAVIOUR_FEATURES, SECONDS_SINCE_PREV_CAP
from fraudd.scoring.confirmed import CONFIRMED_COLUMNS, ConfirmedFraud
from fraudd.scoring.decode import DecodedBatch
from fraudd.settings import packaged

__all__ = [
    "BEHAVIOUR_FEATURES",
    "BLOCKLIST_KINDS",
    "EXTRA_COLUMNS",
    "FEATURE_NAMES",
    "MESSAGE_FEATURES",
    "SECONDS_SINCE_PREV_CAP",
    "FeatureStore",
    "Features",
    "message_columns",
]

# Columns derivable from the message alone; the "no history" baseline model is trained on these.
MESSAGE_FEATURES: tuple[str, ...] = (
    "log_amount",
    "hour_utc",
    "mcc_high_risk",
    "channel",
    "has_device",
    "has_card",
)
FEATURE_NAMES: tuple[str, ...] = MESSAGE_FEATURES + BEHAVIOUR_FEATURES
# Not model inputs, but rules may test them too.
EXTRA_COLUMNS: tuple[str, ...] = ("amount", *CONFIRMED_COLUMNS)

# 24 h windows plus an hour of slack for late events.
STATE_TTL_MS = 25 * 3600 * 1000
# States live in one hash per period of wall-clock time (a key per user with its own TTL cost
# Redis ≈ 2-3 µs per transaction in the commit, one HSET of the batch's states ≈ 1): a period's hash
# lives STATE_TTL_MS after its last write, readers look in the periods before, of and after their
# clock (so clocks of several hosts may differ by anything short of a period) and take the latest
# copy. A user idle for a period or more starts afresh; one idle less than that keeps its state,
# which stays readable between STATE_TTL_MS and twice that after its last write.
STATE_PERIOD_MS = STATE_TTL_MS
# Quasi-cash, wire transfers, gambling, dating, digital goods and other MCCs card schemes and
# acquirers classify as high risk.
HIGH_RISK_MCC = frozenset(
    (
        "4829",
        "5816",
        "5933",
        "5944",
        "5962",
        "5966",
        "5967",
        "6010",
        "6011",
        "6012",
        "6051",
        "6211",
        "6540",
        "7273",
        "7801",
        "7802",
        "7995",
    )
)
_CHANNEL_CODES: dict[str | None, float] = {"pos": 1.0, "ecom": 2.0, "atm": 3.0}

# Library and function are named after their calling convention, so during a rolling upgrade the
# old and the new workers each keep their own loaded side by side instead of replacing each other's.
LIBRARY_NAME = "fraudd_v6"
FUNCTION_NAME = "fraudd_commit_v6"
READ_FUNCTION = "fraudd_owned_read_v6"
LEASE_FUNCTION = "fraudd_lease_v6"
_LIBRARY = packaged("fraudd.scoring", "features.lua").read_text()
# Key names carry a layout version, so a changed packing starts fresh instead of misreading.
_STATES_INFIX = "u3:"


class CommitConflictError(RuntimeError):
    """A commit kept meeting a change under it (a user's state, or the lease it is fenced by)."""


@dataclass(slots=True)
class Features:
    """The batch's feature matrix plus what the pipeline needs beside the model inputs."""

    matrix: np.ndarray  # float32 (n, len(FEATURE_NAMES))
    seen: np.ndarray  # bool (n,): already counted earlier (redelivery or producer retry)
    event_ms: np.ndarray  # int64 (n,): the first occurrence's event time (the row's partition key)
    blocked: dict[str, np.ndarray]  # bool (n,) per BLOCKLIST_KINDS entry
    amount: np.ndarray  # float64 (n,)
    confirmed: dict[str, np.ndarray] = field(default_factory=dict)  # CONFIRMED_COLUMNS, from labels
    published_rules: bytes | None = None  # the shard's rule-set pointer as this batch read it (rulesets/pointer.py)

    def __len__(self) -> int:
        return len(self.seen)

    def column(self, name: str) -> np.ndarray:
        """One feature (or extra) column by name."""
        if name == "amount":
            return self.amount
        if name in CONFIRMED_COLUMNS:
            return self.confirmed.get(name, np.zeros(len(self.seen), dtype=np.float32))
        return self.matrix[:, FEATURE_NAMES.index(name)]


def message_columns(batch: DecodedBatch) -> np.ndarray:
    """The MESSAGE_FEATURES columns, float32 (n, len(MESSAGE_FEATURES))."""
    out = np.empty((len(batch), len(MESSAGE_FEATURES)), dtype=np.float32)
    out[:, 0] = np.log1p(batch.amount)
    out[:, 1] = np.floor(batch.timestamp / 3600.0) % 24
    n = len(batch)
    # map over a column runs the per-value call in C, where a comprehension runs Python per value.
    out[:, 2] = np.fromiter(map(HIGH_RISK_MCC.__contains__, batch.mcc), bool, n)
    out[:, 3] = np.fromiter(map(_CHANNEL_CODES.get, batch.channel, repeat(0.0)), np.float64, n)
    out[:, 4] = np.fromiter(map(is_not, batch.device_id, repeat(None)), bool, n)
    out[:, 5] = np.fromiter(map(is_not, batch.card_id, repeat(None)), bool, n)
    return out


def state_periods(keys: Keys, period: int | None = None) -> list[str]:
    """The keys of the state periods before, of and after ``period`` (default: this host's clock's)."""
    period = current_period() if period is None else period
    return [period_key(keys, p) for p in (period - 1, period, period + 1)]


def current_period() -> int:
    return int(time.time() * 1000) // STATE_PERIOD_MS


def period_key(keys: Keys, period: int) -> str:
    return f"{keys.prefix}{_STATES_INFIX}{period}"


def stored_states(client: redis.Redis | RedisCluster, keys: Keys, users: list[str]) -> list[bytes | None]:
    """The behaviour states of ``users`` of the shard as Redis holds them (``behaviour.STATE``, None
    when absent): what operators and tests inspect, without knowing the layout."""
    if not users:
        return []
    pipe = client.pipeline(transaction=False)
    for key in reversed(state_periods(keys)):
        pipe.hmget(key, users)
    return newest_states(pipe.execute())


def newest_states(periods: list[list[bytes | None]]) -> list[bytes | None]:
    """Per user, its state in the latest period that holds one: ``periods`` are the replies of the
    HMGETs of ``state_periods`` in reverse (newest first)."""
    if not periods:
        return []
    newest = periods[0]
    for older in periods[1:]:
        # Usually the newer periods hold none of the users (only a clock ahead writes there).
        if newest.count(None) == len(newest):
            newest = older
        elif None in newest:
            newest = [state if state is not None else stored for state, stored in zip(newest, older)]
    return newest


def load_library(client: redis.Redis | RedisCluster) -> None:
    """(Re)install the Function library; REPLACE makes it safe to call from every worker."""
    client.function_load(_LIBRARY, replace=True)


class FeatureStore(Protocol):
    """What the worker computes a shard's features with, counting each transaction once."""

    def compute(self, batch: DecodedBatch) -> Features:
        """Features of every transaction of ``batch``; new ones are added to the state, once.

        The first occurrence of a transaction id in batch order is the original; later copies in
        the batch, and transactions whose dedup marker already exists, are ``seen`` and not added
        again. A copy takes its original's features; a transaction counted in an earlier batch is
        scored at the original's event time against the state that already holds it.
        """
        ...


@dataclass(slots=True)
class Prepared:
    """A batch's columns as the behaviour arithmetic takes them, with its users and their keys; the
    batch is a read of one part or several (``prepare``)."""

    tx: behaviour.Transactions
    copy: np.ndarray  # bool: a later copy of a transaction earlier in its part
    original: np.ndarray  # intp: each row's first occurrence in its part
    names: list[str]  # users in order of first appearance
    distinct: list[list[list[str]]]  # per part, per BLOCKLIST_KINDS, its values to look up
    bounds: list[int]  # where each part's rows begin, then the end
    user_bounds: list[int]  # where each part's users (of ``names``) begin, then the end

    def blocklist_values(self, part: int = 0) -> list[bytes]:
        """Per BLOCKLIST_KINDS, the part's values to look up as the Functions take them (NUL-joined)."""
        return ["\0".join(values).encode() for values in self.distinct[part]]

    def copies_take_their_originals_time(self) -> None:
        """A copy is scored at its original's event time, which a marker found may have corrected."""
        self.tx.t_ms[self.copy] = self.tx.t_ms[self.original[self.copy]]


# What a store computes per batch: the behaviour columns, the blocklist flags (per BLOCKLIST_KINDS,
# '0'/'1' per distinct value) and the reply of the command it was asked to send along.
Behaviour = Callable[[Prepared, list[str], Command], tuple[np.ndarray, list[bytes], Any]]


def compute_features(batch: DecodedBatch, keys: Keys, confirmed: ConfirmedFraud, behaviour_of: Behaviour) -> Features:
    """``FeatureStore.compute`` with the store's ``behaviour_of``: the message columns, the behaviour
    and blocklists the store computes, the confirmed-fraud counts and the published rule sets."""
    if len(batch) == 0:
        return empty_features()
    p = prepare(batch)
    # The confirmed-fraud version and the published rule sets ride on the batch's first round trip
    # rather than their own (both keys carry the shard's hash tag).
    behaviour_columns, blocklist_hits, versions = behaviour_of(p, batch.transaction_id, versions_command([(keys, confirmed)]))
    (features,) = assemble(batch, p, behaviour_columns, [PartReplies(blocklist_hits, cast(list[Any], versions), confirmed)])
    return features


def versions_command(shards: Sequence[tuple[Keys, ConfirmedFraud]]) -> Command:
    """The read of the shards' confirmed-fraud versions and published rule sets, sent along with
    the read's first round trip (``PartReplies.versions`` takes its reply, two values a shard)."""
    return ("MGET", *(key for keys, confirmed in shards for key in (confirmed.version_key, keys.rules)))


@dataclass(slots=True)
class PartReplies:
    """What a part's shard answered for a read, and the shard's confirmed fraud (its counts)."""

    blocklist_hits: list[bytes]  # per BLOCKLIST_KINDS, '0'/'1' per value looked up
    versions: Sequence[bytes | None]  # the shard's two values of versions_command's reply
    confirmed: ConfirmedFraud


def assemble(batch: DecodedBatch, p: Prepared, behaviour_columns: np.ndarray, replies: Sequence[PartReplies]) -> list[Features]:
    """Each part's ``Features`` from what its store computed: the behaviour columns of the read,
    and per part what its shard answered; assembled once for the read, each part's a slice of it."""
    n = len(batch)
    # A copy whose original belongs to another user is only corrected here.
    p.copies_take_their_originals_time()

    matrix = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    matrix[:, : len(MESSAGE_FEATURES)] = message_columns(batch)
    matrix[:, len(MESSAGE_FEATURES) :] = behaviour_columns
    # A copy is its original, so it takes the original's features (whichever of them the
    # idempotent store keeps, it is the same decision). Evaluated against the batch's final state,
    # its behaviour could differ: that state no longer tells exactly what preceded the original
    # once more of the user's transactions follow it (recent times, merchants and cards are
    # bounded), and how many do depends on how the stream is batched and sharded.
    matrix[p.copy] = matrix[p.original[p.copy]]
    blocked = {kind: np.zeros(n, dtype=bool) for kind in BLOCKLIST_KINDS}
    confirmed = {name: np.zeros(n, dtype=np.float32) for name in CONFIRMED_COLUMNS}
    event_ms = p.tx.t_ms.astype(np.int64)
    seen = ~p.tx.new
    spans = list(zip(p.bounds, p.bounds[1:]))
    features = []
    for (start, end), distinct, part in zip(spans, p.distinct, replies):
        rows = slice(start, end)
        for kind, column, values, flags in zip(BLOCKLIST_KINDS, blocklist_columns(batch), distinct, part.blocklist_hits):
            if b"1" in flags:
                blocked[kind][rows] = _flags(column[rows], values, flags)
        confirmed_version, published_rules = part.versions
        entities: tuple[Sequence[str | None], ...] = (batch.merchant, batch.device_id, batch.ip, batch.card_id)
        if len(spans) > 1:
            entities = tuple(column[rows] for column in entities)
        part.confirmed.counts(entities, event_ms[rows], confirmed_version, {name: c[rows] for name, c in confirmed.items()})
        features.append(
            Features(
                matrix=matrix[rows],
                seen=seen[rows],
                event_ms=event_ms[rows],
                blocked={kind: flags[rows] for kind, flags in blocked.items()},
                amount=batch.amount[rows],
                confirmed={name: counts[rows] for name, counts in confirmed.items()},
                published_rules=published_rules,
            )
        )
    return features


# A value longer than any hash-max-listpack-value in use (Redis's default is 64): features.lua uses the same.
_AS_HASH_TABLE = b"-" * 1024


@dataclass(slots=True)
class Markers:
    """The dedup markers of some rows of a batch (of a read's parts, each a shard's), in bucket
    order within each part: one HMGET or HSET per part's bucket."""

    rows: np.ndarray  # intp: the batch rows, in (part, bucket) order
    order: np.ndarray  # intp: for each marker, its position among the rows as given
    bucket: np.ndarray  # int64: each marker's bucket
    offset_ms: np.ndarray  # int64: each marker's event time in its bucket
    bucket_ids: list[int]  # each group's bucket: the distinct (part, bucket) pairs, in order
    bucket_counts: np.ndarray  # the markers of each group
    parts: list[int]  # each group's part

    @classmethod
    def of(cls, rows: np.ndarray, t_ms: np.ndarray, part: np.ndarray | None = None) -> Markers:
        """The markers of ``rows``, whose event times are ``t_ms[rows]`` (float ms, as behaviour's);
        ``part``: each row's part of the read (None: one part), whose keys its markers go to."""
        event_ms = t_ms[rows].astype(np.int64)
        bucket = dedup.buckets(event_ms)
        # lexsort is stable, as the single part's argsort: a bucket's markers keep the rows' order.
        of_part = np.zeros(len(rows), np.intp) if part is None else part[rows]
        order = np.argsort(bucket, kind="stable") if part is None else np.lexsort((bucket, of_part))
        bucket, of_part = bucket[order], of_part[order]
        change = np.ones(len(bucket), bool)
        change[1:] = (bucket[1:] != bucket[:-1]) | (of_part[1:] != of_part[:-1])
        starts = np.flatnonzero(change)
        return cls(
            rows[order],
            order,
            bucket,
            event_ms[order] - bucket * dedup.BUCKET_MS,
            bucket[starts].tolist(),
            np.diff(starts, append=len(bucket)),
            of_part[starts].tolist(),
        )

    def keys(self, shards: Sequence[Keys]) -> list[str]:
        """Each group's hash, of its part's shard (``shards``, by part)."""
        return [shards[part].seen_bucket(b) for part, b in zip(self.parts, self.bucket_ids)]

    def spans(self) -> list[tuple[int, int]]:
        """Each group's markers, as the [start, end) of their positions."""
        ends = np.cumsum(self.bucket_counts).tolist()
        return list(zip([0, *ends], ends))

    def counts(self) -> bytes:
        """The marker count of each bucket, 4 bytes big-endian each, as the Functions take them."""
        return self.bucket_counts.astype(">u4").tobytes()

    def ids(self, transaction_ids: list[str]) -> list[str]:
        return [transaction_ids[i] for i in self.rows.tolist()]

    def pairs(self, transaction_ids: list[str]) -> list[Any]:
        """(transaction id, offset) of each marker, flat: the fields and values of the buckets' HSETs."""
        return interleave(self.ids(transaction_ids), self.offset_ms.tolist())

    def writes(self, shards: Sequence[Keys], transaction_ids: list[str], windows_ms: Sequence[int]) -> list[list[Command]]:
        """Per part (of ``shards``, by part), the plain commands storing its markers, each bucket a
        hash table for the part's dedup window.

        The field ``''`` (never a transaction id) with a value longer than Redis's
        hash-max-listpack-value rides ahead of the markers and is taken out again: a bucket is then
        a hash table from its first batch, not a listpack scanned on every marker added or looked up
        (features.lua's ``add_markers`` says what that saves), and still holds its markers alone."""
        pairs = self.pairs(transaction_ids)
        commands: list[list[Command]] = [[] for _ in shards]
        for part, key, (start, end) in zip(self.parts, self.keys(shards), self.spans()):
            commands[part] += [
                ("HSET", key, "", _AS_HASH_TABLE, *pairs[2 * start : 2 * end]),
                ("HDEL", key, ""),
                ("PEXPIRE", key, windows_ms[part]),
            ]
        return commands

    def found(self, seen: list[Any], tx: behaviour.Transactions) -> list[int]:
        """Mark the rows whose marker a Function found stored (``seen``: flat pairs of 1-based marker
        number and stored offset) as seen, at their original's event time; their marker numbers."""
        numbers = []
        for j in range(0, len(seen), 2):
            marker = int(seen[j]) - 1
            row = self.rows[marker]
            tx.new[row] = False
            tx.t_ms[row] = float(self.bucket[marker] * dedup.BUCKET_MS + int(seen[j + 1]))
            numbers.append(marker)
        return numbers


def interleave(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
    """``first[0], second[0], first[1], ...``: field/value pairs as HSET takes them."""
    pairs: list[Any] = [None] * (2 * len(first))
    pairs[0::2], pairs[1::2] = first, second
    return pairs


def split_states(encoded: bytes) -> list[bytes]:
    """The states ``behaviour.encode`` packed into one string, one each."""
    size = behaviour.STATE.itemsize
    return [encoded[i : i + size] for i in range(0, len(encoded), size)]


class ShardCalls:
    """The calls of one shard's feature store to Redis, each one round trip.

    Every key of a call carries the shard's hash tag, so on a Redis Cluster the call goes as is to
    the node serving the shard's slot (or ``node``, when the store pinned the one it found earlier);
    when that node failed or the slot moved, the slot map is learnt again and the error is an
    outage for the caller to wait out and retry."""

    def __init__(self, client: redis.Redis | RedisCluster, keys: Keys) -> None:
        # States are binary blobs parsed with numpy; a decoding client would mangle them.
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("a feature store needs a Redis client with decode_responses=False")
        self.client = client
        self.keys = keys
        self.blocklist_keys = [keys.blocklist(kind) for kind in BLOCKLIST_KINDS]
        # Per BLOCKLIST_KINDS, whether the shard's blocklist was empty when last looked up. A batch
        # then holds that kind's values back and probes the set with one EXISTS (an empty set is
        # no key) until it is found filled: the values (≈ 85 bytes a transaction over the five
        # kinds) cost Redis ≈ 0.2 µs per transaction as Lua strings, even to learn the set is empty.
        self._unused_blocklists = [False] * len(BLOCKLIST_KINDS)
        self.node: redis.Redis | None = None
        # A store's calls run in one thread (the worker's batch loop): one connection per node, held.
        self._connection = HeldConnection()
        load_library(client)

    def held_back(self, values: Sequence[bytes]) -> list[int]:
        """The kinds whose ``values`` (per BLOCKLIST_KINDS, NUL-joined) a batch holds back: their
        blocklist was empty at the last look."""
        return [k for k, (unused, value) in enumerate(zip(self._unused_blocklists, values)) if unused and value]

    def probe(self, held: list[int]) -> list[Command]:
        """The command asking whether any blocklist of the ``held`` kinds is filled (none: none)."""
        return [("EXISTS", *(self.blocklist_keys[k] for k in held))] if held else []

    def learn(self, values: Sequence[bytes], flags: Sequence[bytes], looked_up: Iterable[int]) -> None:
        """Remember which of the ``looked_up`` kinds' blocklists were empty: the Functions answer
        no flags for values looked up in an empty set."""
        for k in looked_up:
            if values[k]:
                self._unused_blocklists[k] = flags[k] == b""

    def round_trip(self, commands: Sequence[Outgoing]) -> list[Any]:
        """The raw replies of ``commands``, sent in one round trip (``redis_wire.round_trip``) on the
        connection the store holds to the node."""
        return on_node(self.client, self.keys.stream, lambda client: self._connection.round_trip(client, commands), self.node)

    def fcall(self, function: str, keys: list[str], args: list[Any], *also: Command) -> tuple[list[Any], object]:
        """The function's reply, and the reply of the command ``also`` if any, in one round trip."""
        commands = [("FCALL", function, len(keys), *keys, *args), *also]
        try:
            replies = self.round_trip(commands)
        except redis.ResponseError as exc:
            # A restarted Redis without persistence, or FUNCTION FLUSH, drops the library.
            if redis_error_code(exc) != FUNCTION_NOT_FOUND:
                raise
            load_library(self.client)
            replies = self.round_trip(commands)
        return replies[0], replies[-1] if also else None


def prepare(batch: DecodedBatch, bounds: Sequence[int] | None = None) -> Prepared:
    """The batch's columns for the behaviour arithmetic, its users and the values to look up.

    ``bounds``: where each part of a read begins, then its end (default: one part; none empty).
    Parts are shards, apart in everything: a user, a copy's original and the values to look up
    are each of one part, so the parts' arithmetic is the arithmetic of each alone, in one pass."""
    n = len(batch)
    bounds = [0, n] if bounds is None else list(bounds)
    columns = blocklist_columns(batch)
    whole = [dict.fromkeys(column) for column in columns]
    merchants, devices, _ips, _countries, cards = whole  # BLOCKLIST_KINDS' order
    # Users numbered in order of first appearance; each row's original (first in batch order).
    keys: Sequence[Any] = batch.user_id
    users = dict(zip(dict.fromkeys(keys), range(n)))
    user = np.fromiter(map(users.__getitem__, keys), np.intp, n)
    if len(bounds) > 2 and not _apart(user, bounds):
        keys = _of_parts(batch.user_id, bounds)  # the same user in two shards' streams: two users
        users = dict(zip(dict.fromkeys(keys), range(n)))
        user = np.fromiter(map(users.__getitem__, keys), np.intp, n)
    original = _originals(batch.transaction_id)
    if original is not None and len(bounds) > 2 and not _apart(original, bounds):
        original = _originals(_of_parts(batch.transaction_id, bounds))
    original = np.arange(n) if original is None else original
    copy = original != np.arange(n)
    tx = behaviour.Transactions(
        user=user,
        t_ms=np.round(batch.timestamp * 1000.0),
        new=~copy,
        amount=batch.amount,
        merchant=_hashes(batch.merchant, merchants),
        country=_country_codes(batch.country),
        device=_hashes(batch.device_id, devices),
        card=_hashes(batch.card_id, cards),
    )
    names = list(users) if keys is batch.user_id else [name for _part, name in users]
    distinct = (
        [[_distinct(values) for values in whole]]
        if len(bounds) == 2
        else [[_distinct(dict.fromkeys(column[start:end])) for column in columns] for start, end in zip(bounds, bounds[1:])]
    )
    return Prepared(tx, copy, original, names, distinct, bounds, [*user[bounds[:-1]].tolist(), len(names)] if n else [0, 0])


def _originals(ids: Sequence[Any]) -> np.ndarray | None:
    """Each row's first occurrence in ``ids``; None when every row is its own."""
    n = len(ids)
    firsts = dict(zip(reversed(ids), range(n - 1, -1, -1)))  # the first occurrence is set last
    return None if len(firsts) == n else np.fromiter(map(firsts.__getitem__, ids), np.intp, n)


def _apart(numbers: np.ndarray, bounds: list[int]) -> bool:
    """Whether no part shares a number (a user, a row's original) with a part before it: numbered in
    order of first appearance, each part's smallest is then above every number before it."""
    smallest = np.minimum.reduceat(numbers, bounds[:-1])
    largest = np.maximum.accumulate(np.maximum.reduceat(numbers, bounds[:-1]))
    return bool((smallest[1:] > largest[:-1]).all())


def _of_parts(values: Sequence[str], bounds: list[int]) -> list[tuple[int, str]]:
    """``values`` keyed by their part as well."""
    return list(zip(part_of_rows(bounds).tolist(), values))


def part_of_rows(bounds: Sequence[int]) -> np.ndarray:
    """Each row's part, of parts beginning at ``bounds`` (then the end)."""
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def blocklist_columns(batch: DecodedBatch) -> tuple[Sequence[str | None], ...]:
    """The batch's values of each BLOCKLIST_KINDS entry, in its order."""
    return (batch.merchant, batch.device_id, batch.ip, batch.country, batch.card_id)


def _hashes(values: Sequence[str | None], distinct: dict[str | None, None] | None = None) -> np.ndarray:
    """Stable 32-bit ids (crc32; 0 means absent, so a real 0 becomes 1) for the state's lists.

    ``distinct``: the values' ``dict.fromkeys`` when the caller has it already."""
    present = dict.fromkeys(values) if distinct is None else distinct
    if None not in present:  # every value there: hashed in C, without a look-up per value
        hashes = np.fromiter(map(zlib.crc32, map(str.encode, cast(Sequence[str], values))), np.int64, len(values))
        return np.maximum(hashes, 1)
    names = [v for v in present if v is not None]
    ids: dict[str | None, int] = dict(zip(names, [h or 1 for h in map(zlib.crc32, map(str.encode, names))]))
    ids[None] = 0
    return np.fromiter(map(ids.__getitem__, values), np.int64, len(values))


def _country_codes(countries: list[str | None]) -> np.ndarray:
    """Alpha-2 codes as 16 bits (both letters), 0 when absent."""
    codes: dict[str | None, int] = {c: (ord(c[0]) << 8) | ord(c[1]) for c in set(countries) if c is not None}
    codes[None] = 0
    return np.fromiter((codes[c] for c in countries), np.int64, len(countries))


def _distinct(values: dict[str | None, None]) -> list[str]:
    """The column's distinct values (its ``dict.fromkeys``), in order, that can be looked up."""
    found = [v for v in values if v is not None] if None in values else cast(list[str], list(values))
    # NUL separates the values inside the call; a value holding one can't be blocklisted anyway.
    return [v for v in found if "\0" not in v] if "\0" in "".join(found) else found


def _flags(column: Sequence[str | None], values: list[str], flags: bytes) -> np.ndarray:
    if b"1" not in flags:
        return np.zeros(len(column), dtype=bool)
    hit = {v for v, f in zip(values, flags.decode()) if f == "1"}
    return np.fromiter((v in hit for v in column), bool, len(column))


def empty_features() -> Features:
    return Features(
        matrix=np.empty((0, len(FEATURE_NAMES)), dtype=np.float32),
        seen=np.empty(0, dtype=bool),
        event_ms=np.empty(0, dtype=np.int64),
        blocked={kind: np.empty(0, dtype=bool) for kind in BLOCKLIST_KINDS},
        amount=np.empty(0, dtype=np.float64),
    )
