"""PostgreSQL's binary COPY format, built a column at a time.

A binary COPY row is a field count, then per field a big-endian int32 length (-1: NULL) and the
value's bytes. Formatting that per row and value in Python (psycopg's ``write_row``) costs more
than the server's whole insert. Here each column becomes lists of ready pieces, one piece per row,
made by numpy or by C-level ``map``/``join``/``split`` calls; the columns are interleaved into one
list by slice assignment and one ``b"".join`` makes the payload. No Python code runs per value
but for NULLs in a mostly non-NULL column and non-NULLs in a mostly NULL one.

Fixed-width fields adjacent in the column list share one piece per row, a numpy record of their
lengths and big-endian values (a NULL in one is patched into its row's piece: such fields are
rarely NULL); a text column is two pieces per row, its length and its bytes. Lengths of short
fields are shared objects from a table, not made per value: the join costs per piece, and making
a piece per length (numpy's ``tolist``) cost as much as splitting out the values themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import compress, repeat
from operator import is_, is_not
from typing import Any, TypeVar, cast

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # signature, flags, no extension
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"
_POSTGRES_EPOCH_US = 946_684_800_000_000  # 2000-01-01 UTC in Unix microseconds
_TEXT_OID = 25

_SHORT_LENGTHS = [size.to_bytes(4, "big") for size in range(1 << 12)]  # what most fields' lengths are
V = TypeVar("V")
K = TypeVar("K", bound=Hashable)

Pieces = list[bytes]  # one piece per row
Column = list[Pieces]  # a column's pieces, in the order they follow each other in a row


class Record:
    """Fixed-width fields of every row, one piece per row: each field is its int32 length and value."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._fields: list[tuple[str, np.ndarray | int | float]] = []
        self._nulls: list[tuple[int, int, np.ndarray]] = []  # (offset, width, rows NULL) of a field
        self._size = 0  # bytes of the fields so far: the next field's offset

    def int16(self, value: int) -> Record:
        """A bare int16 without a length: the field count that starts a row."""
        self._fields.append((">i2", value))
        self._size += 2
        return self

    def _field(self, dtype: str, width: int, values: np.ndarray | int | float) -> Record:
        self._fields += [(">i4", width), (dtype, values)]
        self._size += 4 + width
        return self

    def float8(self, values: np.ndarray | float) -> Record:
        return self._field(">f8", 8, values)

    def float4(self, values: np.ndarray | float) -> Record:
        return self._field(">f4", 4, values)

    def nullable_float8(self, values: np.ndarray) -> Record:
        """float8 with NaN as NULL."""
        self._nulls.append((self._size, 12, np.flatnonzero(np.isnan(values))))
        return self.float8(values)

    def timestamptz(self, unix_ms: np.ndarray | int) -> Record:
        return self._field(">i8", 8, np.asarray(unix_ms, dtype=np.int64) * 1000 - _POSTGRES_EPOCH_US)

    def bytea(self, rows: np.ndarray) -> Record:
        """Each row of a 2-D array as one ``bytea`` field: the row's bytes as they lie in memory."""
        width = rows.shape[1] * rows.itemsize
        return self._field(f"V{width}", width, np.ascontiguousarray(rows).view(f"V{width}").reshape(len(rows)))

    def pieces(self) -> Pieces:
        dtype = _record_dtype(tuple(dtype for dtype, _ in self._fields))
        record = np.empty(self._n, dtype=dtype)
        for name, (_, values) in zip(dtype.names or (), self._fields):
            record[name] = values
        pieces: Pieces = record.view(f"V{record.itemsize}").tolist()
        # Later fields first, so an earlier field's offset still holds in a row already patched.
        for offset, width, rows in reversed(self._nulls):
            for i in rows.tolist():
                pieces[i] = pieces[i][:offset] + NULL + pieces[i][offset + width :]
        return pieces


@functools.lru_cache(maxsize=16)
def _record_dtype(fields: tuple[str, ...]) -> np.dtype:
    """The record of these fields' types, made once: a batch's fields are one of a COPY's few
    layouts, and making the type cost ≈ 6 µs a batch (a tenth of a 130-row batch's fields)."""
    return np.dtype([(f"f{i}", dtype) for i, dtype in enumerate(fields)])


def lengths(values: Sequence[bytes]) -> Pieces:
    """Each value's length as the int32 its field starts with."""
    try:
        return list(map(_SHORT_LENGTHS.__getitem__, map(len, values)))
    except IndexError:  # a field of 4 KiB or more
        pieces: Pieces = np.asarray(list(map(len, values)), dtype=">i4").view("V4").tolist()
        return pieces


def present(values: Sequence[Any]) -> list[int]:
    """The rows whose value is not None."""
    return _rows_where(is_not, values)


def _rows_where(test: Callable[[Any, None], bool], values: Sequence[Any]) -> list[int]:
    """The rows whose value passes ``test`` against None, found by C-level ``map``/``compress``
    calls rather than a loop over the rows (numpy's comparison of an object array calls back into
    Python per value, at twice the cost)."""
    return list(compress(range(len(values)), map(test, values, repeat(None))))


def text(values: Sequence[str | None]) -> Column:
    """A text column; None is NULL. The values hold no NUL character (decode rejects it, and
    PostgreSQL's text cannot hold one), so one encode of the joined column and one split give every
    value's bytes."""
    try:
        data = "\x00".join(cast(Sequence[str], values)).encode().split(b"\x00")
    except TypeError:  # a None among them: found by C-level calls, not by a scan of every column
        found = _rows_where(is_, values)
        column = list(values)
        for i in found:
            column[i] = ""
        data = "\x00".join(cast(list[str], column)).encode().split(b"\x00")
        head = lengths(data)
        for i in found:
            head[i] = NULL
        return [head, data]
    return [lengths(data), data]


def categorical(values: Sequence[str | None]) -> Column:
    """A text column of few distinct values (currencies, countries, channels): each distinct value
    is encoded once, and a row's field is one piece instead of two. None is NULL."""
    return [_CATEGORIES.fields(values)]


class _Fields:
    """The fields of the values of categorical columns, kept from batch to batch: a batch's values
    are looked up in one C-level ``map``, and only a value not seen before is encoded (finding a
    batch's distinct values, then encoding them, cost a third of a categorical column). Values
    are codes of a few letters or digits, or channels; should there be more of them than
    ``kept``, the fields start anew."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._table: dict[str | None, bytes] = {None: NULL}

    def fields(self, values: Sequence[str | None]) -> Pieces:
        table = self._table  # one table throughout, even if another thread starts anew meanwhile
        try:
            return list(map(table.__getitem__, values))
        except KeyError:
            pass
        if len(table) > self._kept:
            table = self._table = {None: NULL}
        for value in dict.fromkeys(values):
            if value not in table:
                table[value] = field(cast(str, value).encode())
        return list(map(table.__getitem__, values))


_CATEGORIES = _Fields(kept=1 << 14)


def constant(n: int, *values: bytes | None) -> Column:
    """Adjacent columns with the same value in every row (a batch's model version, say), as one
    piece per row; None is NULL."""
    return [[b"".join(NULL if v is None else field(v) for v in values)] * n]


def by_code(codes: np.ndarray, values: Sequence[bytes]) -> Column:
    """A column of few distinct values, given as codes into ``values`` (each value's bytes)."""
    table = [field(v) for v in values]
    return [list(map(table.__getitem__, codes.tolist()))]


def memoized(values: Sequence[V], key: Callable[[V], K], field_of: Callable[[K], bytes]) -> Column:
    """A column whose values repeat (lists of reasons): each distinct ``key`` is encoded once."""
    keys = list(map(key, values))
    table = {k: field_of(k) for k in dict.fromkeys(keys)}
    return [list(map(table.__getitem__, keys))]


def sparse(n: int, values: dict[int, bytes]) -> Column:
    """A column that is NULL but in a few rows: row -> value's bytes."""
    pieces = [NULL] * n
    for i, head, data in zip(values, lengths(list(values.values())), values.values()):
        pieces[i] = head + data
    return [pieces]


def text_array(items: Sequence[str]) -> bytes:
    """One text[] field: dimensions, no NULL elements, element type text, then each element."""
    if not items:
        return field(np.array([0, 0, _TEXT_OID], dtype=">i4").tobytes())
    head = np.array([1, 0, _TEXT_OID, len(items), 1], dtype=">i4").tobytes()
    return field(head + b"".join(field(s.encode()) for s in items))


def field(data: bytes) -> bytes:
    """One non-NULL field: its length and its bytes."""
    return len(data).to_bytes(4, "big") + data


def rows(n: int, columns: Sequence[Column]) -> Pieces:
    """``n`` rows of the columns' pieces interleaved: a part of a payload's body (``payload``)."""
    flat = [pieces for column in columns for pieces in column]
    width = len(flat)
    interleaved: Pieces = [b""] * (n * width)
    for j, pieces in enumerate(flat):
        interleaved[j::width] = pieces
    return interleaved


def payload(bodies: Iterable[Pieces]) -> bytes:
    """HEADER, the rows' pieces and TRAILER joined at once: a payload is copied once, not once more
    per concatenation (it is half a megabyte for a batch of 1,000 rows)."""
    pieces = [HEADER]
    for body in bodies:
        pieces += body
    pieces.append(TRAILER)
    return b"".join(pieces)
