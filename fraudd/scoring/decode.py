"""Turn a batch of raw stream entries into validated numpy columns.

The happy path decodes the whole batch with one ``orjson.loads`` over the payloads joined into a
JSON array; only a batch that holds a bad payload falls back to one ``loads`` per entry, so that
each bad entry gets its own reason and the good ones in the same batch are still scored.

``check_payload`` / ``check_object`` judge one transaction by the same rules, field by field, for
the HTTP ingest: what they accept the batch decoder accepts, so nothing the ingest writes is ever
dead-lettered for its content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

import numpy as np
import orjson

from ..runtime.deadletters import REASON_MAX_DELIVERIES, Rejected

MAX_PAYLOAD_BYTES = 16 * 1024
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 256

# Reasons written to the DLQ; operators filter on them, so they are a contract.
REASON_TOO_LARGE = "payload_too_large"
REASON_NOT_UTF8 = "invalid_utf8"
REASON_NOT_JSON = "invalid_json"
REASON_NOT_OBJECT = "not_an_object"
REASON_MISSING = "missing_field"
REASON_INVALID = "invalid_field"
REASON_NO_DATA = "missing_data_field"
REASON_PROCESSING = "processing_error"
DEAD_LETTER_REASONS = (
    REASON_TOO_LARGE,
    REASON_NOT_UTF8,
    REASON_NOT_JSON,
    REASON_NOT_OBJECT,
    REASON_MISSING,
    REASON_INVALID,
    REASON_NO_DATA,
    REASON_MAX_DELIVERIES,
    REASON_PROCESSING,
)

# A payload holding two top-level values ("{...},{...}") would shift every later element of the
# joined array onto the wrong entry; such batches take the per-entry path instead.
_VALUE_BOUNDARY = re.compile(rb"\}\s*,")
_CHANNELS = frozenset(("pos", "ecom", "atm"))
# Event times from 2001 to 2100: anything outside is a unit mix-up (ms instead of s) or garbage.
_EPOCH_MIN, _EPOCH_MAX = 978307200.0, 4102444800.0
_NOTHING: dict[str, Any] = {}
_NUMBER_TYPES = (int, float)
_STR = {str}
_FLOAT_OR_NONE = {float, type(None)}
# JSON may spell a NUL character as an escape; PostgreSQL text cannot hold one, so a transaction
# carrying it in a stored text field would fail its COPY instead of being rejected up front.
_ESCAPED_NUL = b"\\u0000"
_REQUIRED = ("transaction_id", "user_id", "amount", "merchant", "timestamp")
_TIMESTAMP_PROBLEM = "not Unix seconds (2001-2100) or RFC 3339 with an offset"
_T = TypeVar("_T")
_Default = TypeVar("_Default", str, None)


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a payload cannot be scored: the DLQ reason, the field at fault (None: the payload as a
    whole) and what is wrong with it."""

    reason: str
    field: str | None
    message: str

    @property
    def detail(self) -> str:
        """The DLQ's ``detail``: the missing field's name, or ``<field>: <what is wrong>``."""
        if self.field is None:
            return self.message
        return self.field if self.reason == REASON_MISSING else f"{self.field}: {self.message}"


@dataclass(slots=True)
class DecodedBatch:
    """The valid transactions of one read, as columns; row i of every column is one transaction.

    Text columns are Python lists (they go to Redis and PostgreSQL as text anyway); numeric
    columns are numpy arrays so features and rules work on the whole batch at once.
    """

    entry_ids: list[str]
    transaction_id: list[str]
    user_id: list[str]
    merchant: list[str]
    amount: np.ndarray  # float64
    timestamp: np.ndarray  # float64 Unix seconds (event time)
    card_id: list[str | None]
    currency: list[str]
    mcc: list[str | None]
    country: list[str | None]
    device_id: list[str | None]
    ip: list[str | None]
    channel: list[str | None]
    lat: np.ndarray  # float64, NaN when absent
    lon: np.ndarray
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entry_ids)

    def take(self, rows: np.ndarray | Sequence[int]) -> DecodedBatch:
        """The sub-batch of the given row positions (rejections are not carried over)."""
        positions = list(rows)
        pick = _picker(positions)
        index = np.asarray(positions, dtype=np.intp)
        return DecodedBatch(
            entry_ids=pick(self.entry_ids),
            transaction_id=pick(self.transaction_id),
            user_id=pick(self.user_id),
            merchant=pick(self.merchant),
            amount=self.amount[index],
            timestamp=self.timestamp[index],
            card_id=pick(self.card_id),
            currency=pick(self.currency),
            mcc=pick(self.mcc),
            country=pick(self.country),
            device_id=pick(self.device_id),
            ip=pick(self.ip),
            channel=pick(self.channel),
            lat=self.lat[index],
            lon=self.lon[index],
        )


def _picker(rows: list[int]) -> Callable[[list[_T]], list[_T]]:
    return lambda column: [column[i] for i in rows]


def decode_batch(entry_ids: Sequence[str], payloads: Sequence[bytes | None]) -> DecodedBatch:
    """Validate and decode one batch. Never raises on bad input: bad entries become ``rejected``."""
    rejected: list[Rejected] = []
    ok_ids: list[str] = []
    ok_payloads: list[bytes] = []
    for entry_id, payload in zip(entry_ids, payloads):
        if payload is None:
            rejected.append(Rejected(entry_id, b"", REASON_NO_DATA, "entry has no 'data' field"))
        elif len(payload) > MAX_PAYLOAD_BYTES:
            rejected.append(Rejected(entry_id, payload, REASON_TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}"))
        else:
            ok_ids.append(entry_id)
            ok_payloads.append(payload)

    objects = _loads_joined(ok_payloads)
    if objects is None:
        objects = [_loads_one(entry_id, payload, rejected) for entry_id, payload in zip(ok_ids, ok_payloads)]
    return _columns(ok_ids, ok_payloads, objects, rejected)


def _loads_joined(payloads: list[bytes]) -> list[Any] | None:
    """One ``loads`` for the batch, or None when some payload needs the per-entry path."""
    if not payloads:
        return []
    for payload in payloads:
        if payload[:1] != b"{" or payload[-1:] != b"}":
            return None
    if _VALUE_BOUNDARY.search(b"\n".join(payloads)):
        return None
    try:
        objects = orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        return None
    return objects if len(objects) == len(payloads) else None


def _loads_one(entry_id: str, payload: bytes, rejected: list[Rejected]) -> object:
    value = json_value(payload)
    if isinstance(value, Problem):
        rejected.append(Rejected(entry_id, payload, value.reason, value.message))
        return _ALREADY_REJECTED
    return value


_ALREADY_REJECTED = object()


def _columns(entry_ids: list[str], payloads: list[bytes], objects: list[Any], rejected: list[Rejected]) -> DecodedBatch:
    """Columns of the acceptable objects, built one column at a time.

    The common case is checked with a few list comprehensions over the batch; only rows that fail
    them (a bad field, or an RFC 3339 timestamp to parse) go through the per-row checks that name
    the reason.
    """
    # Field values are whatever JSON held: the checks below, not the types, make them columns.
    get: list[Callable[[str], Any]] = [o.get if o.__class__ is dict else _NOTHING.get for o in objects]
    txid = [g("transaction_id") for g in get]
    user = [g("user_id") for g in get]
    merchant = [g("merchant") for g in get]
    amount = [g("amount") for g in get]
    stamp = [g("timestamp") for g in get]
    joined = b"".join(payloads)
    # The escape starts with a backslash, which most batches lack: one memchr rules it out.
    if b"\\" in joined and _ESCAPED_NUL in joined:
        # Rows spelling a NUL take the per-row checks, which name the field at fault.
        clean = [_ESCAPED_NUL not in p for p in payloads]
    else:
        clean = [True] * len(payloads)
    fast = [
        c
        and t.__class__ is str
        and 0 < len(t) <= MAX_ID_CHARS
        and u.__class__ is str
        and 0 < len(u) <= MAX_TEXT_CHARS
        and m.__class__ is str
        and 0 < len(m) <= MAX_TEXT_CHARS
        and a.__class__ in _NUMBER_TYPES
        and z.__class__ in _NUMBER_TYPES
        for c, t, u, m, a, z in zip(clean, txid, user, merchant, amount, stamp)
    ]
    amounts = np.array([a if ok else 1.0 for a, ok in zip(amount, fast)], dtype=np.float64)
    seconds = np.array([z if ok else _EPOCH_MIN for z, ok in zip(stamp, fast)], dtype=np.float64)
    in_range = np.isfinite(amounts) & (amounts > 0) & (seconds >= _EPOCH_MIN) & (seconds < _EPOCH_MAX)
    accepted = in_range & np.array(fast, dtype=bool)
    if not accepted.all():
        for i in np.flatnonzero(~accepted).tolist():
            if objects[i] is _ALREADY_REJECTED:
                continue
            checked = check_object(objects[i])
            if isinstance(checked, Problem):
                rejected.append(Rejected(entry_ids[i], payloads[i], checked.reason, checked.detail))
            else:
                seconds[i] = checked
                accepted[i] = True
        rows = np.flatnonzero(accepted)
        keep = rows.tolist()
        get = [get[i] for i in keep]
        entry_ids, txid, user, merchant = ([column[i] for i in keep] for column in (entry_ids, txid, user, merchant))
        amounts, seconds = amounts[rows], seconds[rows]
    currency = [g("currency") for g in get]
    mcc = [g("mcc") for g in get]
    country = [g("country") for g in get]
    channel = [g("channel") for g in get]
    return DecodedBatch(
        entry_ids=entry_ids,
        transaction_id=txid,
        user_id=user,
        merchant=merchant,
        amount=amounts,
        timestamp=seconds,
        card_id=_texts([g("card_id") for g in get], MAX_ID_CHARS),
        currency=_codes(currency, 3, "USD"),
        mcc=[c if c.__class__ is str and len(c) == 4 and c.isdigit() else None for c in mcc],
        country=_codes(country, 2, None),
        device_id=_texts([g("device_id") for g in get], MAX_TEXT_CHARS),
        ip=_texts([g("ip") for g in get], 64),
        channel=[c if c in _CHANNELS else None for c in channel],
        lat=_coordinates([g("lat") for g in get], 90.0),
        lon=_coordinates([g("lon") for g in get], 180.0),
        rejected=rejected,
    )


def json_value(payload: bytes) -> object | Problem:
    """The payload's JSON value, or why it has none: not UTF-8, or not JSON."""
    try:
        value: object = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return Problem(REASON_NOT_UTF8, None, str(exc))
        return Problem(REASON_NOT_JSON, None, str(exc))
    return value


def check_payload(payload: bytes) -> tuple[dict[str, Any], float] | Problem:
    """One payload judged as ``decode_batch`` judges it: (the object, its event time in Unix
    seconds) when the worker would score it, else the problem it would be dead-lettered for."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Problem(REASON_TOO_LARGE, None, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    obj = json_value(payload)
    if isinstance(obj, Problem):
        return obj
    checked = check_object(obj)
    return checked if isinstance(checked, Problem) else (cast(dict[str, Any], obj), checked)


def check_object(obj: object) -> float | Problem:
    """A decoded payload's event time (Unix seconds), or the first problem with its required fields.

    The callers bound the size of the payload: ``check_payload`` or, for an object that is written
    re-serialized, the caller itself with ``MAX_PAYLOAD_BYTES``.
    """
    if not isinstance(obj, dict):
        return Problem(REASON_NOT_OBJECT, None, f"payload is a JSON {type(obj).__name__}, not an object")
    for name in _REQUIRED:
        if name not in obj or obj[name] is None:
            return Problem(REASON_MISSING, name, "required")
    for name, limit in (("transaction_id", MAX_ID_CHARS), ("user_id", MAX_TEXT_CHARS), ("merchant", MAX_TEXT_CHARS)):
        value = obj[name]
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            return Problem(REASON_INVALID, name, f"must be a string of 1-{limit} characters")
        if "\x00" in value:
            return Problem(REASON_INVALID, name, "must not contain NUL (U+0000)")
    amount = obj["amount"]
    # bool is an int subclass, and JSON true is not an amount.
    if amount.__class__ not in _NUMBER_TYPES:
        return Problem(REASON_INVALID, "amount", "must be a number")
    if not (math.isfinite(amount) and amount > 0):
        return Problem(REASON_INVALID, "amount", "must be finite and > 0")
    seconds = _timestamp(obj["timestamp"])
    if seconds is None:
        return Problem(REASON_INVALID, "timestamp", _TIMESTAMP_PROBLEM)
    return seconds


def _timestamp(value: Any) -> float | None:
    if value.__class__ in _NUMBER_TYPES:
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        seconds = parsed.timestamp()
    else:
        return None
    return seconds if _EPOCH_MIN <= seconds < _EPOCH_MAX else None


def _text(value: Any, limit: int) -> str | None:
    return value if value.__class__ is str and 0 < len(value) <= limit and "\x00" not in value else None


# The optional columns below are judged column by column: when every value is of the usual kind,
# a few C-level passes over the column (types, lengths, one join) stand for a Python call per value;
# any other column takes the per-value check.


def _texts(values: list[Any], limit: int) -> list[str | None]:
    """``_text`` of every value."""
    if (
        values
        and set(map(type, values)) == _STR
        and 0 < min(map(len, values))
        and max(map(len, values)) <= limit
        and "\x00" not in "".join(values)
    ):
        return values
    return [_text(v, limit) for v in values]


def _codes(values: list[Any], length: int, default: _Default) -> list[str | _Default]:
    """Every value upper-cased when it is a code of ``length`` ASCII letters, else ``default``."""
    if values and set(map(type, values)) == _STR and set(map(len, values)) == {length}:
        joined = "".join(values)
        if joined.isalpha() and joined.isascii():
            return list(map(str.upper, values))
    return [c.upper() if _is_code(c, length) else default for c in values]


def _coordinates(values: list[Any], limit: float) -> np.ndarray:
    """``_coordinate`` of every value."""
    if set(map(type, values)) <= _FLOAT_OR_NONE:
        column = np.array(values, dtype=np.float64)  # None becomes NaN
        with np.errstate(invalid="ignore"):
            column[~(np.abs(column) <= limit)] = math.nan  # NaN stays, ±inf and out of range go
        return column
    return np.array([_coordinate(v, limit) for v in values], dtype=np.float64)


def _is_code(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and value.isalpha() and value.isascii()


def _coordinate(value: Any, limit: float) -> float:
    if value.__class__ in _NUMBER_TYPES and math.isfinite(value) and -limit <= value <= limit:
        return float(value)
    return math.nan
