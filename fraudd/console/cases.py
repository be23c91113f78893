"""SQL of cases: filling them from new decisions, a case with its evidence, and verdicts.

A verdict resolves the case once (the UPDATE that resolves it refuses a resolved one) and, in the
same PostgreSQL transaction, stores the label with ``fraudd.learning.labels.store_labels``, the
one writer of ``label_history`` and ``labels`` that ``POST /v1/labels`` ends in too (source
``console:<username>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

import psycopg

from ..learning.labels import Label, store_labels
from . import links
from .queue import rank_sql

RECENT = 20
VERDICTS = {"fraud": "Fraud", "legit": "Legitimate"}
TYPOLOGIES = ("", "stolen card", "account takeover", "card testing", "friendly fraud", "merchant fraud", "other")


def sync(conn: psycopg.Connection, slas: dict[str, timedelta]) -> int:
    """Copy the decisions scored since the newest case (review and decline; the first time, those of
    the last ``links.FIRST_SYNC``, each pass overlapping the last by ``links.OVERLAP``) into
    ``cases``, ranked against their queue's SLA in ``slas``; returns how many were new."""
    return conn.execute(
        f"""INSERT INTO cases (transaction_id, event_time, created_at, user_id, decision, score, amount,
                               merchant, country, reasons, rank)
            SELECT t.transaction_id, t.event_time, t.scored_at, t.user_id, t.decision, t.score, t.amount,
                   t.merchant, t.country, t.reasons, {rank_sql(slas, "t")}
            FROM transactions t
            WHERE t.decision <> 'approve'
              AND t.scored_at > coalesce((SELECT max(created_at) FROM cases) - %s, clock_timestamp() - %s)
            ON CONFLICT (transaction_id) DO NOTHING""",
        (links.OVERLAP, links.FIRST_SYNC),
    ).rowcount


def rerank(conn: psycopg.Connection, slas: dict[str, timedelta]) -> int:
    """Recompute the stored priority of the unresolved cases of the queues in ``slas`` for their SLA
    (after a lead changed it, or --sla-minutes changed); returns how many moved."""
    rank = rank_sql(slas)
    return conn.execute(
        f"UPDATE cases SET rank = {rank} WHERE state <> 'resolved' AND decision = ANY(%s) AND rank <> {rank}", (list(slas),)
    ).rowcount


@dataclass(frozen=True, slots=True)
class CaseFile:
    """A case with everything its page shows."""

    case: dict
    transaction: dict
    recent: list[dict]
    linked: list[dict]
    notes: list[dict]


def _dicts(cursor: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def case_file(conn: psycopg.Connection, transaction_id: str) -> CaseFile | None:
    cases = _dicts(conn.execute("SELECT * FROM cases WHERE transaction_id = %s", (transaction_id,)))
    if not cases:
        return None
    case = cases[0]
    # The whole row, so columns added later (rules_version, explanation) reach the page as they land.
    row = conn.execute(
        "SELECT to_jsonb(t) FROM transactions t WHERE transaction_id = %s AND event_time = %s",
        (transaction_id, case["event_time"]),
    ).fetchone()
    transaction = row[0] if row else {}
    recent = _dicts(
        conn.execute(
            """SELECT t.transaction_id, t.event_time, t.amount, t.currency, t.merchant, t.country, t.decision, t.score,
                      l.label
               FROM transactions t LEFT JOIN labels l USING (transaction_id)
               WHERE t.user_id = %s ORDER BY t.event_time DESC LIMIT %s""",
            (case["user_id"], RECENT),
        )
    )
    return CaseFile(case, transaction, recent, links.linked(conn, transaction, case["event_time"]), notes(conn, transaction_id))


def notes(conn: psycopg.Connection, transaction_id: str) -> list[dict]:
    return _dicts(
        conn.execute(
            "SELECT author, body, created_at FROM case_notes WHERE transaction_id = %s ORDER BY created_at", (transaction_id,)
        )
    )


def add_note(conn: psycopg.Connection, transaction_id: str, author: str, body: str) -> None:
    conn.execute("INSERT INTO case_notes (transaction_id, author, body) VALUES (%s, %s, %s)", (transaction_id, author, body))


class VerdictRefused(Exception):
    """The case cannot take this verdict: resolved already, held by someone else, or unknown."""


@dataclass(frozen=True, slots=True)
class Resolved:
    transaction_id: str
    verdict: str
    time_to_verdict_s: float  # from the case's creation
    label: Label


def resolve(
    conn: psycopg.Connection,
    transaction_ids: list[str],
    username: str,
    verdict: str,
    typology: str = "",
    claimed_only: bool = True,
) -> list[Resolved]:
    """Give ``transaction_ids`` the ``verdict`` and store its label, in the caller's transaction.

    With ``claimed_only`` (one analyst's verdict) a case held by someone else under a live lease is
    refused; otherwise (a lead's bulk verdict) only open cases are taken. A resolved case is never
    resolved again. Returns what was resolved.
    """
    held = "(state = 'open' OR assignee = %(user)s OR lease_until < clock_timestamp())" if claimed_only else "state = 'open'"
    rows = conn.execute(
        f"""UPDATE cases SET state = 'resolved', verdict = %(verdict)s, typology = nullif(%(typology)s, ''),
                             resolved_by = %(user)s, resolved_at = clock_timestamp(), lease_until = NULL
            WHERE transaction_id = ANY(%(ids)s) AND state <> 'resolved' AND {held}
            RETURNING transaction_id, resolved_at, extract(epoch FROM resolved_at - created_at)""",
        {"verdict": verdict, "typology": typology, "user": username, "ids": transaction_ids},
    ).fetchall()
    labels = [Label(txid, verdict, f"console:{username}", at.astimezone(UTC)) for txid, at, _ in rows]
    store_labels(conn, labels)
    return [Resolved(row[0], verdict, float(row[2]), label) for row, label in zip(rows, labels)]
