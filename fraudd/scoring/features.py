"""Model input features for a whole batch: message columns and behaviour, both with numpy.

Behaviour state is shared by every worker and must count each transaction once however often it
is delivered, so it lives in Redis; but Redis is the one single-threaded process all workers
share, so it only stores it. Per batch: one pipelined read (MGET of the users' states plus the
blocklists), the arithmetic in the worker (``behaviour.py``), then one atomic commit call that
writes each user's state only if it is unchanged since the read, together with its transactions'
dedup markers. A conflict (another worker wrote the user, or a transaction was already counted)
is re-read and recomputed for the users concerned only, so idempotency costs extra only when a
duplicate or a race actually happens. Training computes features through the same
``FeatureStore.compute`` on a scratch key prefix, so offline features are the live ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import hiredis
import numpy as np
import redis

from fraudd.keys import Keys
from fraudd.scoring import behaviour, dedup
from fraudd.scoring.behaviour import BEHAVIOUR_FEATURES, SECONDS_SINCE_PREV_CAP
from fraudd.scoring.decode import DecodedBatch

__all__ = ["BEHAVIOUR_FEATURES", "BLOCKLIST_KINDS", "EXTRA_COLUMNS", "FEATURE_NAMES", "MESSAGE_FEATURES",
           "SECONDS_SINCE_PREV_CAP", "FeatureStore", "Features", "message_columns"]

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
EXTRA_COLUMNS: tuple[str, ...] = ("amount",)
BLOCKLIST_KINDS: tuple[str, ...] = ("merchant", "device", "ip", "country")

# 24 h windows plus an hour of slack for late events; refreshed on every write, so only users
# idle for a day vanish.
STATE_TTL_MS = 25 * 3600 * 1000
# Quasi-cash, wire transfers, gambling, dating, digital goods and other MCCs card schemes and
# acquirers classify as high risk.
HIGH_RISK_MCC = frozenset(
    ("4829", "5816", "5933", "5944", "5962", "5966", "5967", "6010", "6011", "6012", "6051",
     "6211", "6540", "7273", "7801", "7802", "7995")
)
_CHANNEL_CODES = {"pos": 1.0, "ecom": 2.0, "atm": 3.0}

# Library and function are named after their calling convention, so during a rolling upgrade the
# old and the new workers each keep their own loaded side by side instead of replacing each other's.
LIBRARY_NAME = "fraudd_v3"
FUNCTION_NAME = "fraudd_commit_v3"
_LIBRARY = (Path(__file__).with_name("features.lua")).read_text()
# Key names carry a layout version, so a changed packing starts fresh instead of misreading.
_USER_INFIX = "u2:"
# Each round of conflicts settles at least one racing writer or teaches every already-counted
# transaction of the users concerned, so a handful suffice; more means something is wrong.
MAX_COMMIT_ATTEMPTS = 20
# The commit compares only a state's first bytes, its version stamp (newest event time and the
# count of transactions applied, which grows with every commit: see features.lua); all zero when
# the user had no state.
STAMP_SIZE = 12
_ABSENT = bytes(STAMP_SIZE)
assert behaviour.STATE.names[:2] == ("head_ms", "n") and behaviour.STATE.fields["n"][1] + 4 == STAMP_SIZE


class CommitConflictError(RuntimeError):
    """The behaviour state of some users kept changing under us for MAX_COMMIT_ATTEMPTS reads."""


@dataclass(slots=True)
class Features:
    """The batch's feature matrix plus what the pipeline needs beside the model inputs."""

    matrix: np.ndarray  # float32 (n, len(FEATURE_NAMES))
    seen: np.ndarray  # bool (n,): already counted earlier (redelivery or producer retry)
    event_ms: np.ndarray  # int64 (n,): the first occurrence's event time (the row's partition key)
    blocked: dict[str, np.ndarray]  # bool (n,) per BLOCKLIST_KINDS entry
    amount: np.ndarray  # float64 (n,)

    def __len__(self) -> int:
        return len(self.seen)

    def column(self, name: str) -> np.ndarray:
        """One feature (or extra) column by name."""
        if name == "amount":
            return self.amount
        return self.matrix[:, FEATURE_NAMES.index(name)]


def message_columns(batch: DecodedBatch) -> np.ndarray:
    """The MESSAGE_FEATURES columns, float32 (n, len(MESSAGE_FEATURES))."""
    out = np.empty((len(batch), len(MESSAGE_FEATURES)), dtype=np.float32)
    out[:, 0] = np.log1p(batch.amount)
    out[:, 1] = np.floor(batch.timestamp / 3600.0) % 24
    out[:, 2] = [mcc in HIGH_RISK_MCC for mcc in batch.mcc]
    out[:, 3] = [_CHANNEL_CODES.get(channel, 0.0) for channel in batch.channel]
    out[:, 4] = [device is not None for device in batch.device_id]
    out[:, 5] = [card is not None for card in batch.card_id]
    return out


class FeatureStore:
    """Computes features for a batch and records it in the shared behaviour state, exactly once."""

    def __init__(self, redis_client: redis.Redis, keys: Keys, dedup_window_ms: int) -> None:
        # States are binary blobs parsed with numpy; a decoding client would mangle them.
        if redis_client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("FeatureStore needs a Redis client with decode_responses=False")
        self._redis = redis_client
        self._keys = keys
        self._dedup_window_ms = int(dedup_window_ms)
        self._blocklist_keys = [keys.blocklist(kind) for kind in BLOCKLIST_KINDS]
        self.load_library()

    def load_library(self) -> None:
        """(Re)install the Function library; REPLACE makes it safe to call from every worker."""
        self._redis.function_load(_LIBRARY, replace=True)

    def compute(self, batch: DecodedBatch) -> Features:
        """Features of every transaction of ``batch``; new ones are added to the state, once.

        The first occurrence of a transaction id in batch order is the original; later copies in
        the batch, and transactions whose dedup marker already exists, are ``seen``: scored at the
        original's event time against the state that already holds it, and not added again.
        """
        n = len(batch)
        if n == 0:
            return _empty()
        distinct_merchants, distinct_devices = dict.fromkeys(batch.merchant), dict.fromkeys(batch.device_id)
        # Users numbered in order of first appearance; each row's original (first in batch order).
        users = {u: i for i, u in enumerate(dict.fromkeys(batch.user_id))}
        user = np.fromiter(map(users.__getitem__, batch.user_id), np.intp, n)
        ids = batch.transaction_id
        firsts = dict(zip(reversed(ids), range(n - 1, -1, -1)))  # the first occurrence is set last
        original = np.arange(n) if len(firsts) == n else np.fromiter(map(firsts.__getitem__, ids), np.intp, n)
        copy = original != np.arange(n)
        tx = behaviour.Transactions(
            user=user,
            t_ms=np.round(batch.timestamp * 1000.0),
            new=~copy,
            amount=batch.amount,
            merchant=_hashes(batch.merchant, distinct_merchants),
            country=_country_codes(batch.country),
            device=_hashes(batch.device_id, distinct_devices),
            card=_hashes(batch.card_id),
        )
        names = list(users)
        user_prefix = self._keys.prefix + _USER_INFIX
        user_keys = [user_prefix + u for u in names]
        distinct = [_distinct(distinct_merchants), _distinct(distinct_devices), _distinct(dict.fromkeys(batch.ip)),
                    _distinct(dict.fromkeys(batch.country))]

        behaviour_columns = np.empty((n, len(BEHAVIOUR_FEATURES)))
        pending = np.arange(len(names))
        blocklist_hits: list[list] = []
        for _ in range(MAX_COMMIT_ATTEMPTS):
            blobs = self._read([user_keys[i] for i in pending])
            # Copies take their original's event time, which a commit conflict may have corrected.
            tx.t_ms[copy] = tx.t_ms[original[copy]]
            local = np.full(len(names), -1, np.intp)
            local[pending] = np.arange(len(pending))
            rows = np.flatnonzero(local[user] >= 0)
            sub = behaviour.Transactions(local[user[rows]], tx.t_ms[rows], tx.new[rows], tx.amount[rows],
                                         tx.merchant[rows], tx.country[rows], tx.device[rows], tx.card[rows])
            states = behaviour.decode(blobs)
            behaviour_columns[rows] = behaviour.compute(states, sub)
            # Blocklists are looked up once, in the first commit call.
            joined = [] if blocklist_hits else ["\0".join(values).encode() for values in distinct]
            pending, hits = self._commit(states, sub, rows, blobs, pending, user_keys, batch.transaction_id, tx, joined)
            blocklist_hits = blocklist_hits or hits
            if len(pending) == 0:
                break
        else:
            raise CommitConflictError(
                f"behaviour state of {len(pending)} users still conflicting after {MAX_COMMIT_ATTEMPTS} attempts")
        # A copy whose original belongs to another user is only corrected here.
        tx.t_ms[copy] = tx.t_ms[original[copy]]

        matrix = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
        matrix[:, : len(MESSAGE_FEATURES)] = message_columns(batch)
        matrix[:, len(MESSAGE_FEATURES) :] = behaviour_columns
        columns = (batch.merchant, batch.device_id, batch.ip, batch.country)
        blocked = {
            kind: _flags(column, values, flags)
            for kind, column, values, flags in zip(BLOCKLIST_KINDS, columns, distinct, blocklist_hits)
        }
        return Features(
            matrix=matrix,
            seen=~tx.new,
            event_ms=tx.t_ms.astype(np.int64),
            blocked=blocked,
            amount=batch.amount,
        )

    def _read(self, state_keys: list[str]) -> list[bytes | None]:
        """The users' states as stored (None = absent): the batch's one read, no Lua."""
        return self._execute("MGET", *state_keys)

    def _execute(self, *args) -> object:
        """One command, packed by hiredis in one call: redis-py's own packing inspects every
        argument in Python, ≈ 3 µs per transaction with the one-per-user and one-per-transaction
        arguments of the read and the commit. No response callbacks apply to MGET and FCALL."""
        if self._redis.connection is not None:  # a single-connection client
            return self._redis.execute_command(*args)
        pool = self._redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([hiredis.pack_command(args)], check_health=False)
            return conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            # redis-py's own path reconnects and retries as the client is configured to.
            conn.disconnect()
        finally:
            pool.release(conn)
        return self._redis.execute_command(*args)

    def _commit(self, states: behaviour.States, sub: behaviour.Transactions, rows: np.ndarray, blobs: list,
                pending: np.ndarray, user_keys: list[str], transaction_ids: list[str], tx: behaviour.Transactions,
                blocklist_values: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
        """Writes the users that have new transactions; returns the users to read again and the
        blocklist flags (when ``blocklist_values`` asked for them).

        A user whose transaction turns out to be counted already is left unchanged, and those
        transactions become ``seen`` (at their stored original event time) for the next attempt.
        """
        new = np.flatnonzero(sub.new)
        writers, owner = np.unique(sub.user[new], return_inverse=True)
        if len(writers) == 0 and not blocklist_values:
            return pending[:0], []
        t_ms = tx.t_ms[rows[new]].astype(np.int64)
        bucket = dedup.buckets(t_ms)
        # Markers grouped by bucket: one HMGET and one HSET per bucket in the call.
        order = np.argsort(bucket, kind="stable")
        marker_rows, bucket, owner = rows[new][order], bucket[order], owner[order]
        bucket_ids, bucket_counts = np.unique(bucket, return_counts=True)
        pairs: list = [None] * (2 * len(marker_rows))
        pairs[0::2] = [transaction_ids[i] for i in marker_rows.tolist()]
        pairs[1::2] = (t_ms[order] - bucket * dedup.BUCKET_MS).tolist()
        size = behaviour.STATE.itemsize
        news = behaviour.encode(states, writers)
        keys = [user_keys[i] for i in pending[writers].tolist()]
        keys += [self._keys.seen_bucket(b) for b in bucket_ids.tolist()]
        keys += self._blocklist_keys
        args = [self._dedup_window_ms, STATE_TTL_MS, len(writers), len(bucket_ids),
                b"".join([(blobs[w] or _ABSENT)[:STAMP_SIZE] for w in writers.tolist()]),
                bucket_counts.astype(">u4").tobytes(), (owner + 1).astype(">u4").tobytes(),
                *(blocklist_values or [b""] * 4)]
        args += [news[i : i + size] for i in range(0, len(news), size)]
        args += pairs
        stale, seen, *flags = self._fcall(keys, args)
        conflicted = {int(w) - 1 for w in stale}
        for j in range(0, len(seen), 2):
            marker = int(seen[j]) - 1
            row = marker_rows[marker]
            conflicted.add(int(owner[marker]))
            tx.new[row] = False
            tx.t_ms[row] = float(bucket[marker] * dedup.BUCKET_MS + int(seen[j + 1]))
        return pending[writers[sorted(conflicted)]], flags

    def _fcall(self, keys: list[str], args: list) -> list:
        try:
            return self._execute("FCALL", FUNCTION_NAME, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            # A restarted Redis without persistence, or FUNCTION FLUSH, drops the library.
            if "function not found" not in str(exc).lower():
                raise
        self.load_library()
        return self._execute("FCALL", FUNCTION_NAME, len(keys), *keys, *args)


def _fixed_width(numbers: np.ndarray, width: int) -> bytes:
    """Decimal numbers, zero-padded to ``width`` characters each, as one string."""
    if len(numbers) == 0:
        return b""
    return np.char.zfill(numbers.astype(f"S{width}"), width).tobytes()


def _hashes(values: list[str | None], distinct: dict | None = None) -> np.ndarray:
    """Stable 32-bit ids (crc32; 0 means absent, so a real 0 becomes 1) for the state's lists.

    ``distinct``: the values' ``dict.fromkeys`` when the caller has it already."""
    ids = dict.fromkeys(values) if distinct is None else dict(distinct)
    ids.pop(None, None)
    ids = dict(zip(ids, [h or 1 for h in map(zlib.crc32, map(str.encode, ids))]))
    ids[None] = 0
    return np.fromiter(map(ids.__getitem__, values), np.int64, len(values))


def _country_codes(countries: list[str | None]) -> np.ndarray:
    """Alpha-2 codes as 16 bits (both letters), 0 when absent."""
    codes = {c: (ord(c[0]) << 8) | ord(c[1]) for c in set(countries) if c is not None}
    codes[None] = 0
    return np.fromiter((codes[c] for c in countries), np.int64, len(countries))


def _distinct(values: dict) -> list[str]:
    """The column's distinct values (its ``dict.fromkeys``), in order, that can be looked up."""
    # NUL separates the values inside the call; a value holding one can't be blocklisted anyway.
    return [v for v in values if v is not None and "\0" not in v]


def _flags(column: list[str | None], values: list[str], flags: bytes) -> np.ndarray:
    if b"1" not in flags:
        return np.zeros(len(column), dtype=bool)
    hit = {v for v, f in zip(values, flags.decode()) if f == "1"}
    return np.fromiter((v in hit for v in column), bool, len(column))


def _empty() -> Features:
    return Features(
        matrix=np.empty((0, len(FEATURE_NAMES)), dtype=np.float32),
        seen=np.empty(0, dtype=bool),
        event_ms=np.empty(0, dtype=np.int64),
        blocked={kind: np.empty(0, dtype=bool) for kind in BLOCKLIST_KINDS},
        amount=np.empty(0, dtype=np.float64),
    )
