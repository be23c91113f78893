"""Turn a batch of raw stream entries into validated numpy columns.

The payloads are joined into one JSON array. The usual batch, every payload of it acceptable and
holding only the documented fields, is decoded by one typed ``msgspec`` call whose field types
state the required fields' rules, so no row needs a check of its own. Any other batch takes the
general path: one ``orjson.loads`` over the array and the checks column by column; only a batch
that holds a bad payload falls back to one ``loads`` per entry, so that each bad entry gets its own
reason and the good ones in the same batch are still scored.

``check_object`` judges one transaction by the same rules, field by field, and names the problem.
``check_transaction`` is how the HTTP API judges one: those rules, plus every optional field in its
documented form (the decoder drops a malformed optional field; the API refuses it, so the client
learns of its mistake). What the API accepts the batch decoder accepts, so nothing the ingest
writes is ever dead-lettered for its content. ``fraudd/ingest/openapi.json`` states these rules;
its constraints are the constants below (a test holds the two together).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from operator import attrgetter
from typing import Annotated, Any, TypeVar, cast

import msgspec
import numpy as np
import orjson

from ..runtime.deadletters import REASON_MAX_DELIVERIES, Rejected

MAX_PAYLOAD_BYTES = 16 * 1024
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 256
MAX_IP_CHARS = 64
# Beyond any payment; bounds what features and sums ever see (1e308 would overflow them).
MAX_AMOUNT = 1e12
# Event times: Unix seconds from 2001 up to 2100, or RFC 3339 of the years 2001-2099 (as written,
# in its own offset). Anything outside is a unit mix-up (ms instead of s) or garbage.
EPOCH_MIN, EPOCH_MAX = 978307200.0, 4102444800.0
YEAR_MIN, YEAR_MAX = 2001, 2099
# Identifiers end up in HTTP headers, e-mail subjects, logs and links of alerts: no control
# characters (Unicode Cc: C0, DEL, C1), which would split or forge a header or a log line. JSON
# Schema's (ECMA 262) and Python's regular expressions read this the same way.
IDENTIFIERS = ("transaction_id", "user_id", "merchant", "card_id", "device_id", "ip")
NO_CONTROL_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
CHANNELS = ("pos", "ecom", "atm")
CURRENCY_PATTERN = "^[A-Za-z]{3}$"
COUNTRY_PATTERN = "^[A-Za-z]{2}$"
MCC_PATTERN = "^[0-9]{4}$"
LAT_LIMIT, LON_LIMIT = 90.0, 180.0

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
_CHANNELS = frozenset(CHANNELS)
_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f]")
# A control character reaches a decoded string only as a backslash escape (JSON refuses a raw C0),
# a raw DEL, or a raw C1 in UTF-8 (C2 80-9F): a batch holding none of these holds none at all.
_C1_UTF8 = re.compile(rb"\xc2[\x80-\x9f]")
_CONTROL_PROBLEM = "must not contain control characters (U+0000-U+001F, U+007F-U+009F)"
_RFC3339 = re.compile(r"(\d{4})-\d\d-\d\d[Tt]\d\d:\d\d:(\d\d)(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)", re.ASCII)
# Anchored here, not in the patterns: Python's "$" also matches before a final newline.
_OPTIONAL_CODES = (
    ("currency", re.compile(CURRENCY_PATTERN[1:-1]), "must be 3 letters (ISO 4217)"),
    ("country", re.compile(COUNTRY_PATTERN[1:-1]), "must be 2 letters (ISO 3166 alpha-2)"),
    ("mcc", re.compile(MCC_PATTERN[1:-1]), "must be 4 digits"),
)
_OPTIONAL_TEXTS = (("card_id", MAX_ID_CHARS), ("device_id", MAX_TEXT_CHARS), ("ip", MAX_IP_CHARS))
_NOTHING: dict[str, Any] = {}
_NUMBER_TYPES = (int, float)
_STR = {str}
_FLOAT = {float}
_FLOAT_OR_NONE = {float, type(None)}
_REQUIRED = ("transaction_id", "user_id", "amount", "merchant", "timestamp")
_TIMESTAMP_PROBLEM = "not Unix seconds (2001-2100) or RFC 3339 with an offset (2001-2099)"
_AMOUNT_PROBLEM = f"must be a number > 0 and <= {MAX_AMOUNT:.0f}"
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
        """The sub-batch of the given row positions (rejections are not carried over); consecutive
        rows (a ``range``) are sliced, not picked one by one."""
        if isinstance(rows, range) and rows.step == 1:
            cut = slice(rows.start, rows.stop)
            return DecodedBatch(**{f.name: getattr(self, f.name)[cut] for f in fields(DecodedBatch) if f.name != "rejected"})
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


class _Transaction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A payload that needs no check of its own: its required fields as ``check_object`` accepts
    them (a number timestamp in range; a string one is parsed after), its optional fields of any
    JSON type (a malformed one is dropped column by column, as on the general path).

    Any other field refuses the batch: msgspec skips the value of a field it does not know
    without the checks orjson makes (UTF-8, numbers out of range), so such a batch is left to
    orjson. msgspec checks each value of a field given twice (a batch it refuses for an earlier one
    is left to orjson, which keeps the last) and keeps the last, as orjson does. Identifiers are
    still searched for control characters.
    """

    transaction_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    # msgspec's float is a JSON number, never true or false; NaN and infinity are no JSON.
    amount: Annotated[float, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
    merchant: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    timestamp: Annotated[float, msgspec.Meta(ge=EPOCH_MIN, lt=EPOCH_MAX)] | str
    card_id: Any = None
    currency: Any = None
    mcc: Any = None
    country: Any = None
    device_id: Any = None
    ip: Any = None
    channel: Any = None
    lat: Any = None
    lon: Any = None


_TRANSACTIONS = msgspec.json.Decoder(list[_Transaction])
_TRANSACTION_FIELDS = tuple(map(attrgetter, _Transaction.__struct_fields__))


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

    array = _joined(ok_payloads)
    if array is not None:
        whole = _whole(ok_ids, array, rejected)
        if whole is not None:
            return whole
    objects = None if array is None else _loads_joined(array, len(ok_payloads))
    if objects is None:
        objects = [_loads_one(entry_id, payload, rejected) for entry_id, payload in zip(ok_ids, ok_payloads)]
    return _columns(ok_ids, ok_payloads, objects, rejected, array)


def _joined(payloads: list[bytes]) -> bytes | None:
    """The payloads as one JSON array, or None when some payload needs the per-entry path."""
    for payload in payloads:
        if payload[:1] != b"{" or payload[-1:] != b"}":
            return None
    if _VALUE_BOUNDARY.search(b"\n".join(payloads)):
        return None
    return b"[" + b",".join(payloads) + b"]"


def _whole(entry_ids: list[str], array: bytes, rejected: list[Rejected]) -> DecodedBatch | None:
    """The batch when every payload in ``array`` is a ``_Transaction`` whose identifiers hold no
    control character and whose timestamp, if a string, parses; else None (the general path)."""
    try:
        transactions = _TRANSACTIONS.decode(array)
    # A ValidationError (a field that breaks a rule) is a DecodeError; msgspec's nesting limit,
    # lower than orjson's, raises RecursionError.
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(transactions) != len(entry_ids):
        return None
    txid, user, amount, merchant, stamp, card, currency, mcc, country, device, ip, channel, lat, lon = (
        list(map(get, transactions)) for get in _TRANSACTION_FIELDS
    )
    if _may_hold_control(array) and not all(_rows_without_control((txid, user, merchant, card, device, ip))):
        return None
    if set(map(type, stamp)) - _FLOAT:
        stamp = [z if z.__class__ is float else _timestamp(z) for z in stamp]
        if None in stamp:
            return None
    return _batch(
        entry_ids,
        txid,
        user,
        merchant,
        np.array(amount, dtype=np.float64),
        np.array(stamp, dtype=np.float64),
        (card, currency, mcc, country, device, ip, channel, lat, lon),
        rejected,
    )


def _loads_joined(array: bytes, count: int) -> list[Any] | None:
    """One ``loads`` for the batch, or None when some payload needs the per-entry path."""
    try:
        objects = orjson.loads(array)
    except orjson.JSONDecodeError:
        return None
    return objects if len(objects) == count else None


def _loads_one(entry_id: str, payload: bytes, rejected: list[Rejected]) -> object:
    value = json_value(payload)
    if isinstance(value, Problem):
        rejected.append(Rejected(entry_id, payload, value.reason, value.message))
        return _ALREADY_REJECTED
    return value


_ALREADY_REJECTED = object()


def _columns(
    entry_ids: list[str], payloads: list[bytes], objects: list[Any], rejected: list[Rejected], array: bytes | None
) -> DecodedBatch:
    """Columns of the acceptable objects, built one column at a time (``array``: the payloads
    joined, when they were).

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
    card = [g("card_id") for g in get]
    device = [g("device_id") for g in get]
    ip = [g("ip") for g in get]
    # Rows that hold a control character take the per-row checks, which name the field at fault.
    if _may_hold_control(b"".join(payloads) if array is None else array):
        clean = _rows_without_control((txid, user, merchant, card, device, ip))
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
    seconds = np.array([z if ok else EPOCH_MIN for z, ok in zip(stamp, fast)], dtype=np.float64)
    # NaN and infinity fail the amount's comparisons.
    in_range = (amounts > 0) & (amounts <= MAX_AMOUNT) & (seconds >= EPOCH_MIN) & (seconds < EPOCH_MAX)
    accepted = in_range & np.array(fast, dtype=bool)
    if not accepted.all():
        for i in np.flatnonzero(~accepted).tolist():
            if objects[i] is _ALREADY_REJECTED:
                continue
            checked = check_object(objects[i])
            if isinstance(checked, Problem):
                rejected.append(Rejected(entry_ids[i], payloads[i], checked.reason, checked.detail))
            else:
                amounts[i], seconds[i] = objects[i]["amount"], checked
                accepted[i] = True
        rows = np.flatnonzero(accepted)
        keep = rows.tolist()
        get = [get[i] for i in keep]
        entry_ids, txid, user, merchant, card, device, ip = (
            [column[i] for i in keep] for column in (entry_ids, txid, user, merchant, card, device, ip)
        )
        amounts, seconds = amounts[rows], seconds[rows]
    currency, mcc, country, channel, lat, lon = (
        [g(name) for g in get] for name in ("currency", "mcc", "country", "channel", "lat", "lon")
    )
    optional = (card, currency, mcc, country, device, ip, channel, lat, lon)
    return _batch(entry_ids, txid, user, merchant, amounts, seconds, optional, rejected)


def _batch(
    entry_ids: list[str],
    txid: list[str],
    user: list[str],
    merchant: list[str],
    amounts: np.ndarray,
    seconds: np.ndarray,
    optional: tuple[list[Any], ...],
    rejected: list[Rejected],
) -> DecodedBatch:
    """The batch of accepted rows; ``optional``: their raw card_id, currency, mcc, country,
    device_id, ip, channel, lat and lon, each dropped (None, NaN, the default) where malformed."""
    card, currency, mcc, country, device, ip, channel, lat, lon = optional
    return DecodedBatch(
        entry_ids=entry_ids,
        transaction_id=txid,
        user_id=user,
        merchant=merchant,
        amount=amounts,
        timestamp=seconds,
        card_id=_texts(card, MAX_ID_CHARS),
        currency=_codes(currency, 3, "USD"),
        mcc=[c if c.__class__ is str and len(c) == 4 and c.isdigit() else None for c in mcc],
        country=_codes(country, 2, None),
        device_id=_texts(device, MAX_TEXT_CHARS),
        ip=_texts(ip, MAX_IP_CHARS),
        # Checked for a string first: a list or an object cannot be looked up in a set.
        channel=[c if c.__class__ is str and c in _CHANNELS else None for c in channel],
        lat=_coordinates(lat, LAT_LIMIT),
        lon=_coordinates(lon, LON_LIMIT),
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
    """One payload judged as the API judges it (``check_transaction``): (the object, its event time
    in Unix seconds), else the problem, which the API answers with."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Problem(REASON_TOO_LARGE, None, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    obj = json_value(payload)
    if isinstance(obj, Problem):
        return obj
    checked = check_transaction(obj)
    return checked if isinstance(checked, Problem) else (cast(dict[str, Any], obj), checked)


def check_object(obj: object) -> float | Problem:
    """A decoded payload's event time (Unix seconds), or the first problem the decoder dead-letters
    it for: its required fields, and control characters in any identifier.

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
    for name in IDENTIFIERS:
        value = obj.get(name)
        if value.__class__ is str and _CONTROL.search(value):
            return Problem(REASON_INVALID, name, _CONTROL_PROBLEM)
    amount = obj["amount"]
    # bool is an int subclass, and JSON true is not an amount.
    if amount.__class__ not in _NUMBER_TYPES or not 0 < amount <= MAX_AMOUNT:
        return Problem(REASON_INVALID, "amount", _AMOUNT_PROBLEM)
    seconds = _timestamp(obj["timestamp"])
    if seconds is None:
        return Problem(REASON_INVALID, "timestamp", _TIMESTAMP_PROBLEM)
    return seconds


def check_transaction(obj: object) -> float | Problem:
    """``check_object``, then the rules the decoder does not enforce but the API's schema states: a
    string timestamp in RFC 3339 form, and each optional field absent, null, or in its documented
    form."""
    seconds = check_object(obj)
    if isinstance(seconds, Problem):
        return seconds
    fields = cast(dict[str, Any], obj)  # check_object accepted it: a JSON object
    if api_seconds(fields["timestamp"]) is None:
        return Problem(REASON_INVALID, "timestamp", _TIMESTAMP_PROBLEM)
    get = fields.get
    for name, limit in _OPTIONAL_TEXTS:
        value = get(name)
        if value is not None and (value.__class__ is not str or len(value) > limit):
            return Problem(REASON_INVALID, name, f"must be a string of at most {limit} characters")
    for name, code, problem in _OPTIONAL_CODES:
        value = get(name)
        if value is not None and (value.__class__ is not str or code.fullmatch(value) is None):
            return Problem(REASON_INVALID, name, problem)
    channel = get("channel")
    if channel is not None and (channel.__class__ is not str or channel not in _CHANNELS):
        return Problem(REASON_INVALID, "channel", f"must be one of {', '.join(CHANNELS)}")
    for name, degrees in (("lat", LAT_LIMIT), ("lon", LON_LIMIT)):
        value = get(name)
        if value is not None and (value.__class__ not in _NUMBER_TYPES or not -degrees <= value <= degrees):
            return Problem(REASON_INVALID, name, f"must be a number from {-degrees:.0f} to {degrees:.0f}")
    return seconds


def _timestamp(value: Any) -> float | None:
    """Unix seconds of an event time: a number, RFC 3339, or (for producers writing the stream
    themselves) another ISO 8601 form with an offset that ``datetime.fromisoformat`` reads."""
    if value.__class__ in _NUMBER_TYPES:
        seconds = float(value)
    elif isinstance(value, str):
        rfc3339 = _rfc3339(value)
        if rfc3339 is not None:
            return rfc3339
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        seconds = parsed.timestamp()
    else:
        return None
    return seconds if EPOCH_MIN <= seconds < EPOCH_MAX else None


def api_seconds(value: object) -> float | None:
    """Unix seconds of a time in the form the API's schema states: a number from EPOCH_MIN up to
    EPOCH_MAX, or an RFC 3339 date-time of the years YEAR_MIN-YEAR_MAX; else None."""
    if value.__class__ in _NUMBER_TYPES:
        return float(value) if EPOCH_MIN <= value < EPOCH_MAX else None
    return _rfc3339(value) if isinstance(value, str) else None


def holds_control(text: str) -> bool:
    """Whether ``text`` holds a control character (see ``NO_CONTROL_PATTERN``)."""
    return _CONTROL.search(text) is not None


def _rfc3339(value: str) -> float | None:
    """Unix seconds of an RFC 3339 date-time of the years YEAR_MIN-YEAR_MAX, else None. Lower-case
    ``t``/``z`` and a leap second (``:60``, read as the next second) are RFC 3339 too."""
    match = _RFC3339.fullmatch(value)
    if match is None or not YEAR_MIN <= int(match[1]) <= YEAR_MAX:
        return None
    leap = match[2] == "60"
    if leap:
        value = value[: match.start(2)] + "59" + value[match.end(2) :]
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        return None
    return parsed.timestamp() + leap


def _may_hold_control(data: bytes) -> bool:
    """Whether decoded strings of ``data`` may hold a control character: three byte searches
    (memchr) rule it out for most batches."""
    return b"\\" in data or b"\x7f" in data or (b"\xc2" in data and _C1_UTF8.search(data) is not None)


def _rows_without_control(columns: tuple[list[Any], ...]) -> list[bool]:
    """Per row: whether none of its identifier ``columns`` holds a control character. A column is
    searched whole (``isprintable`` is one C pass, and rules out most); a row at a time only when
    it holds one, or values of another type."""
    clean = [True] * len(columns[0])
    for column in columns:
        try:
            text = "".join(column)
        except TypeError:  # an absent optional field (None), or a value of another type
            try:
                text = "".join(filter(None, column))
            except TypeError:
                text = None
        if text is not None and (text.isprintable() or _CONTROL.search(text) is None):
            continue
        for i, value in enumerate(column):
            if value.__class__ is str and _CONTROL.search(value):
                clean[i] = False
    return clean


def _text(value: Any, limit: int) -> str | None:
    return value if value.__class__ is str and 0 < len(value) <= limit else None


# The optional columns below are judged column by column: when every value is of the usual kind,
# a few C-level passes over the column (types, lengths, one join) stand for a Python call per value;
# any other column takes the per-value check.


def _texts(values: list[Any], limit: int) -> list[str | None]:
    """``_text`` of every value."""
    if values and set(map(type, values)) == _STR and 0 < min(map(len, values)) and max(map(len, values)) <= limit:
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
