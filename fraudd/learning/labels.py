"""Labels: chargebacks and analyst verdicts, parsed once and stored idempotently.

Labels arrive late and from several places: the stream ``transactions:labels`` (field ``data``:
``{"transaction_id", "label": "fraud"|"legit", "source", "reported_at"}``), ``POST /v1/labels``
on the ingest service, and ``fraudd label --file``. ``parse_labels`` is the one validation and
``store_labels`` the one writer of the tables, so every path means the same thing:

- ``label_history``: every distinct report (transaction, source, time, verdict) once; the same
  report delivered twice is one row;
- ``labels``: the latest verdict per transaction (latest ``reported_at``; a tie goes to the
  verdict ``fraud``, so a chargeback is never hidden by a simultaneous "legit").

``label_entries`` is the one shape of a labels-stream entry, which fraudd writes in one place: the
ingest's ``POST /v1/labels``; ``confirm`` passes fraud verdicts on to the confirmed-fraud counts the scoring reads.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import psycopg
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys, shard_stream
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.decode import MAX_ID_CHARS, api_seconds, holds_control

VERDICTS = ("fraud", "legit")
MAX_SOURCE_CHARS = 128
LABEL_FIELDS = ("transaction_id", "label", "source", "reported_at")


class LabelError(ValueError):
    """A label that cannot be stored; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Label:
    transaction_id: str
    label: str  # "fraud" | "legit"
    source: str
    reported_at: datetime  # aware, UTC

    def document(self) -> dict:
        """The stream's ``data`` document for this label."""
        return {
            "transaction_id": self.transaction_id,
            "label": self.label,
            "source": self.source,
            "reported_at": self.reported_at.timestamp(),
        }


def parse_label(obj: object, default_source: str = "", now: datetime | None = None, not_after: datetime | None = None) -> Label:
    """One label from its JSON document; raises LabelError naming the field.

    ``label`` also accepts 1/0 and true/false (as history files do); ``reported_at`` is Unix
    seconds or RFC 3339 with an offset (``decode.api_seconds``, as the API's schema states) and
    defaults to ``now``, which callers make deterministic (the stream entry's time, the file's
    modification time) so that a report read twice is the same report; ``source`` defaults to
    ``default_source``; a ``reported_at`` later than ``not_after`` (when given) is recorded as
    ``not_after``: no report can date itself ahead of the clock and outrank later verdicts, and
    the API's schema, which cannot state a bound that moves with the clock, stays exact.
    Identifiers hold no control characters, as a transaction's.
    """
    if not isinstance(obj, dict):
        raise LabelError("not a JSON object")
    txid = obj.get("transaction_id")
    if not isinstance(txid, str) or not 1 <= len(txid) <= MAX_ID_CHARS or holds_control(txid):
        raise LabelError(
            f"transaction_id must be a string of 1-{MAX_ID_CHARS} characters without control characters, got {txid!r}"
        )
    verdict = obj.get("label")
    if verdict in (1, True, "1", "true"):
        verdict = "fraud"
    elif verdict in (0, False, "0", "false"):
        verdict = "legit"
    if verdict not in VERDICTS:
        raise LabelError(f'label must be "fraud" or "legit", got {obj.get("label")!r}')
    source = obj.get("source")
    source = default_source if source is None or source == "" else source
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS or holds_control(source):
        raise LabelError(f"source must be a string of at most {MAX_SOURCE_CHARS} characters without control characters")
    reported_at = _time(obj.get("reported_at"), now)
    if not_after is not None:
        reported_at = min(reported_at, not_after)
    return Label(txid, verdict, source, reported_at)


def _time(value: object, now: datetime | None) -> datetime:
    if value is None:
        return now or datetime.now(UTC)
    seconds = api_seconds(value)
    if seconds is None:
        raise LabelError(f"reported_at must be Unix seconds (2001-2100) or RFC 3339 with an offset (2001-2099), got {value!r}")
    return datetime.fromtimestamp(seconds, UTC)


def reported_time(value: object) -> datetime:
    """A ``reported_at`` value as documents give it (Unix seconds or RFC 3339); LabelError otherwise."""
    return _time(value, None)


def parse_labels(
    documents: Iterable[object], default_source: str = "", now: datetime | None = None, not_after: datetime | None = None
) -> tuple[list[Label], list[tuple[int, str]]]:
    """(labels, errors): every document parsed; an error is (position, reason). ``now``: the
    ``reported_at`` of documents without one (default: the current time); ``not_after``: the
    latest ``reported_at`` recorded, a later one taken as it (default: any)."""
    labels, errors = [], []
    now = now or datetime.now(UTC)
    for position, document in enumerate(documents):
        try:
            labels.append(parse_label(document, default_source, now, not_after))
        except LabelError as exc:
            errors.append((position, str(exc)))
    return labels, errors


def read_label_file(data: bytes, name: str) -> list[tuple[int, dict]]:
    """(line number, document) of a ``.csv`` (header: transaction_id,label[,source][,reported_at])
    or JSON Lines file; raises LabelError naming the line that does not parse."""
    if name.endswith(".csv"):
        try:
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise LabelError(f"{name}: not a CSV file: {exc}") from None
        if rows and "transaction_id" not in rows[0]:
            raise LabelError(f"{name}: the header must name transaction_id and label")
        return [(i + 2, _typed(row)) for i, row in enumerate(rows)]
    documents = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append((number, orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            raise LabelError(f"{name} line {number}: not JSON: {exc}") from None
    return documents


def _typed(row: dict[str, str]) -> dict:
    """A CSV row as the JSON document it stands for: CSV has no types, so an empty cell is an
    absent field and a numeric ``reported_at`` is a number."""
    document: dict = {k: v for k, v in row.items() if k in LABEL_FIELDS and v}
    stamp = document.get("reported_at")
    if stamp is not None:
        try:
            document["reported_at"] = float(stamp)
        except ValueError:
            pass
    return document


def store_labels(conn: psycopg.Connection, labels: list[Label]) -> int:
    """Record ``labels`` in one transaction; returns how many reports were new.

    Idempotent: storing the same labels again changes nothing.
    """
    if not labels:
        return 0
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS label_staging (LIKE label_history INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with conn.cursor().copy("COPY label_staging (transaction_id, label, source, reported_at) FROM STDIN") as copy:
            for label in labels:
                copy.write_row((label.transaction_id, label.label, label.source, label.reported_at))
        new = conn.execute(
            """INSERT INTO label_history (transaction_id, label, source, reported_at)
               SELECT DISTINCT transaction_id, label, source, reported_at FROM label_staging
               ON CONFLICT DO NOTHING"""
        ).rowcount
        conn.execute(
            """INSERT INTO labels (transaction_id, label, source, reported_at)
               SELECT DISTINCT ON (transaction_id) transaction_id, label, source, reported_at FROM label_staging
               ORDER BY transaction_id, reported_at DESC, label = 'fraud' DESC, source
               ON CONFLICT (transaction_id) DO UPDATE
               SET label = EXCLUDED.label, source = EXCLUDED.source, reported_at = EXCLUDED.reported_at,
                   updated_at = clock_timestamp()
               WHERE (labels.reported_at, labels.label = 'fraud') < (EXCLUDED.reported_at, EXCLUDED.label = 'fraud')"""
        )
    return new


_SEPARATORS = frozenset("=@;")


def confirm(conn: psycopg.Connection, shards: list[ConfirmedFraud], labels: list[Label]) -> int:
    """Teach the scoring what ``labels`` say about merchants, devices, IPs and cards (after
    ``store_labels``): each labelled transaction that is stored counts for its entities while its
    latest verdict is fraud, in every input shard's state (any shard may see the entity next).
    Returns how many stored transactions the labels named; a label that arrives before its
    transaction was scored teaches nothing."""
    ids = sorted({label.transaction_id for label in labels})
    rows = conn.execute(
        """SELECT t.transaction_id, t.merchant, t.device_id, t.ip, t.card_id,
                  (extract(epoch FROM t.event_time) * 1000)::bigint, (extract(epoch FROM l.reported_at) * 1000)::bigint,
                  l.label = 'fraud'
           FROM transactions t JOIN labels l USING (transaction_id) WHERE t.transaction_id = ANY(%s)""",
        (ids,),
    ).fetchall()
    # The state separates entries with "=", "@" and ";": an id holding one cannot be counted.
    records = [(row[0], row[1:5], row[5], row[6], row[7]) for row in rows if not _SEPARATORS.intersection(row[0])]
    for confirmed in shards:
        confirmed.record(records)
    return len(rows)


def confirmed_shards(client: redis.Redis | RedisCluster, stream: str, shards: int) -> list[ConfirmedFraud]:
    """The confirmed-fraud state of each input shard of ``stream``."""
    return [ConfirmedFraud(client, Keys(shard_stream(stream, shards, k), "", "")) for k in range(shards)]


def label_entries(stream: str, labels: list[Label]) -> list[tuple[str, str, str, str, bytes]]:
    """The XADD commands that append ``labels`` to the labels stream, one entry each."""
    return [("XADD", stream, "*", "data", orjson.dumps(label.document())) for label in labels]
