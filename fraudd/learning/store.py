"""The team's own labelled history, read back from PostgreSQL (``fraudd train --from-postgres``).

The stored rows carry every input field, so each transaction is rebuilt as the input message it
was and goes through the daemon's feature code again, in event-time order: offline features are
the live ones. A transaction is fraud when its latest label says so; one without a label counts
as legitimate (no chargeback or verdict came back), so train on a period old enough for the
team's chargebacks to have arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from fraudd.schema import connect, one_row

from .history import History, TrainingError

_MESSAGE_FIELDS = (
    "transaction_id",
    "user_id",
    "amount",
    "currency",
    "merchant",
    "mcc",
    "country",
    "card_id",
    "device_id",
    "ip",
    "channel",
    "lat",
    "lon",
)


@dataclass
class StoredHistory:
    history: History
    transaction_ids: list[str]
    decisions: list[str]  # as stored
    reasons: list[list[str]]  # as stored: the rules that fired, then the model's reasons
    labelled: np.ndarray  # bool: has a label at all


def labelled_history(postgres_url: str, pg_schema: str, since_s: float) -> History:
    """The transactions of the last ``since_s`` seconds (event time) with their latest labels."""
    return stored_history(postgres_url, pg_schema, since_s).history


def stored_history(postgres_url: str, pg_schema: str, since_s: float) -> StoredHistory:
    """The transactions of the last ``since_s`` seconds (event time) as input messages in event
    order, with their latest labels and stored decisions."""
    columns = ", ".join(f"t.{name}" for name in _MESSAGE_FIELDS)
    with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute(
            f"""SELECT {columns}, extract(epoch FROM t.event_time)::float8, t.decision, t.reasons, l.label IS NOT NULL,
                       coalesce(l.label = 'fraud', false), extract(epoch FROM l.reported_at)::float8
                FROM transactions t LEFT JOIN labels l USING (transaction_id)
                WHERE t.event_time >= now() - make_interval(secs => %s)
                ORDER BY t.event_time, t.stream_id""",
            (since_s,),
        ).fetchall()
        labelled = one_row(conn.execute("SELECT count(*) FROM labels"))[0]
    if not rows:
        raise TrainingError(f"schema {pg_schema}: no stored transactions in the period asked for")
    payloads = []
    for row in rows:
        message = {name: value for name, value in zip(_MESSAGE_FIELDS, row) if value is not None}
        message["timestamp"] = row[len(_MESSAGE_FIELDS)]
        payloads.append(orjson.dumps(message))
    is_fraud = np.fromiter((row[-2] for row in rows), bool, len(rows))
    history = History(
        payloads,
        is_fraud,
        is_fraud.astype(np.int16),
        ("legit", "fraud"),
        f"PostgreSQL schema {pg_schema} (transactions joined with {labelled:,} labels)",
        reported_at=np.array([math.nan if row[-1] is None else row[-1] for row in rows], dtype=np.float64),
    )
    return StoredHistory(
        history,
        [row[0] for row in rows],
        [row[len(_MESSAGE_FIELDS) + 1] for row in rows],
        [row[len(_MESSAGE_FIELDS) + 2] for row in rows],
        np.fromiter((row[-3] for row in rows), bool, len(rows)),
    )
