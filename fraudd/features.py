"""Model input features for a whole batch: message columns with numpy, behaviour from one FCALL.

The behaviour half lives in Redis (``features.lua``) because it must be shared by every worker,
atomic with the dedup marker (a transaction is counted once however often it is delivered) and
cheap for the one single-threaded process all workers share. Training streams generated
transactions through the same Function on a scratch key prefix, so offline features are the live
ones by construction.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from fraudd.decode import DecodedBatch
from fraudd.keys import Keys

# Columns derivable from the message alone; the "no history" baseline model is trained on these.
MESSAGE_FEATURES: tuple[str, ...] = (
    "log_amount",
    "hour_utc",
    "mcc_high_risk",
    "channel",
    "has_device",
    "has_card",
)
BEHAVIOUR_FEATURES: tuple[str, ...] = (
    "count_1m",
    "count_1h",
    "count_24h",
    "amount_sum_24h",
    "amount_to_mean",
    "distinct_merchants_1h",
    "distinct_merchants_24h",
    "distinct_countries_1h",
    "distinct_countries_24h",
    "seconds_since_prev",
    "new_device",
    "new_country",
    "new_merchant",
    "card_count_1m",
    "card_count_1h",
    "card_count_24h",
)
FEATURE_NAMES: tuple[str, ...] = MESSAGE_FEATURES + BEHAVIOUR_FEATURES
# Not model inputs, but rules may test them too.
EXTRA_COLUMNS: tuple[str, ...] = ("amount",)
BLOCKLIST_KINDS: tuple[str, ...] = ("merchant", "device", "ip", "country")

# "No previous transaction" and "long ago" are the same thing to the model; a cap keeps the
# column's scale bounded for the training set.
SECONDS_SINCE_PREV_CAP = 86400.0
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

FUNCTION_NAME = "fraudd_features"
_LIBRARY = (Path(__file__).with_name("features.lua")).read_text()
# Key names carry a layout version, so a changed packing starts fresh instead of misreading.
_USER_INFIX = "u1:"
_CARD_INFIX = "c1:"

# Must match REC_FMT / OUT_FMT in features.lua.
_RECORD = np.dtype(
    [("pos", "<u2"), ("user", "<u2"), ("card", "<u2"), ("ts_ms", "<f8"), ("amount", "<f8"),
     ("merchant", "<u4"), ("country", "<u2"), ("device", "<u4")]
)
_OUT = np.dtype(
    [("seen", "u1"), ("event_ms", "<f8"), ("count_1m", "u1"), ("count_1h", "<u2"),
     ("count_24h", "<u2"), ("amount_sum_24h", "<f4"), ("mean_other", "<f4"),
     ("seconds_since_prev", "<f8"), ("distinct_merchants_1h", "u1"),
     ("distinct_merchants_24h", "u1"), ("distinct_countries_1h", "u1"),
     ("distinct_countries_24h", "u1"), ("new_device", "u1"), ("new_country", "u1"),
     ("new_merchant", "u1"), ("card_count_1m", "u1"), ("card_count_1h", "<u2"),
     ("card_count_24h", "<u2")]
)
# Record fields are u2, and Lua's unpack() of one call's arguments tops out near 8000.
MAX_BATCH = 2000


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
        # The reply is a binary blob parsed with numpy; a decoding client would mangle it.
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
        """Features of every transaction of ``batch``; new ones are added to the state, once."""
        n = len(batch)
        if n > MAX_BATCH:
            raise ValueError(f"batch of {n} transactions exceeds MAX_BATCH={MAX_BATCH}")
        if n == 0:
            return _empty()
        users: dict[str, int] = {}
        user_no = np.fromiter((users.setdefault(u, len(users) + 1) for u in batch.user_id), np.uint16, n)
        cards: dict[str, int] = {}
        card_no = np.fromiter(
            (0 if c is None else cards.setdefault(c, len(cards) + 1) for c in batch.card_id), np.uint16, n
        )
        ts_ms = np.round(batch.timestamp * 1000.0)
        position = np.arange(n)
        order = np.lexsort((position, ts_ms, user_no))

        records = np.empty(n, dtype=_RECORD)
        records["pos"] = position[order] + 1
        records["user"] = user_no[order]
        records["card"] = card_no[order]
        records["ts_ms"] = ts_ms[order]
        records["amount"] = batch.amount[order]
        records["merchant"] = _hashes(batch.merchant)[order]
        records["country"] = _country_codes(batch.country)[order]
        records["device"] = _hashes(batch.device_id)[order]

        prefix = self._keys.prefix
        seen_prefix = self._keys.seen_prefix
        key_args = [seen_prefix + txid for txid in batch.transaction_id]
        key_args += [prefix + _USER_INFIX + u for u in users]
        key_args += [prefix + _CARD_INFIX + c for c in cards]
        key_args += self._blocklist_keys
        distinct = [_distinct(batch.merchant), _distinct(batch.device_id), _distinct(batch.ip),
                    _distinct(batch.country)]
        args = [n, len(users), len(cards), self._dedup_window_ms, STATE_TTL_MS, records.tobytes()]
        args += [b"\0".join(v.encode() for v in values) for values in distinct]

        reply = self._fcall(key_args, args)
        out = np.empty(n, dtype=_OUT)
        out[order] = np.frombuffer(reply[0], dtype=_OUT, count=n)

        matrix = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
        matrix[:, : len(MESSAGE_FEATURES)] = message_columns(batch)
        for j, name in enumerate(BEHAVIOUR_FEATURES, start=len(MESSAGE_FEATURES)):
            if name == "amount_to_mean":
                mean = out["mean_other"].astype(np.float64)
                matrix[:, j] = np.divide(batch.amount, mean, out=np.ones(n), where=mean > 0)
            elif name == "seconds_since_prev":
                since = out["seconds_since_prev"]
                matrix[:, j] = np.where((since < 0) | (since > SECONDS_SINCE_PREV_CAP), SECONDS_SINCE_PREV_CAP, since)
            else:
                matrix[:, j] = out[name]

        columns = (batch.merchant, batch.device_id, batch.ip, batch.country)
        blocked = {
            kind: _flags(column, values, flags)
            for kind, column, values, flags in zip(BLOCKLIST_KINDS, columns, distinct, reply[1:])
        }
        return Features(
            matrix=matrix,
            seen=out["seen"].astype(bool),
            event_ms=out["event_ms"].astype(np.int64),
            blocked=blocked,
            amount=batch.amount,
        )

    def _fcall(self, key_args: list[str], args: list) -> list[bytes]:
        try:
            return self._redis.fcall(FUNCTION_NAME, len(key_args), *key_args, *args)
        except redis.ResponseError as exc:
            # A restarted Redis without persistence, or FUNCTION FLUSH, drops the library.
            if "function not found" not in str(exc).lower():
                raise
        self.load_library()
        return self._redis.fcall(FUNCTION_NAME, len(key_args), *key_args, *args)


def _hashes(values: list[str | None]) -> np.ndarray:
    """Stable 32-bit ids (crc32; 0 means absent, so a real 0 becomes 1) for the state's lists."""
    ids = {v: (zlib.crc32(v.encode()) or 1) for v in set(values) if v is not None}
    ids[None] = 0
    return np.fromiter((ids[v] for v in values), np.uint32, len(values))


def _country_codes(countries: list[str | None]) -> np.ndarray:
    """Alpha-2 codes as 16 bits (both letters), 0 when absent."""
    codes = {c: (ord(c[0]) << 8) | ord(c[1]) for c in set(countries) if c is not None}
    codes[None] = 0
    return np.fromiter((codes[c] for c in countries), np.uint16, len(countries))


def _distinct(column: list[str | None]) -> list[str]:
    # NUL separates the values inside the call; a value holding one can't be blocklisted anyway.
    return [v for v in dict.fromkeys(column) if v is not None and "\0" not in v]


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
