"""SQL of the queue: listing cases with filters, counts per state, claiming and leases.

Priority rises with score, amount and age against the SLA. ``cases.rank`` stores it without the
moment it is read at (see the migration), so "breached first, then by priority" is
``ORDER BY created_at < now() - SLA DESC, rank DESC`` over the unresolved cases' index.
A claim is one statement: the best unclaimed case (or one whose lease ran out), locked with
``FOR UPDATE SKIP LOCKED``, so analysts claiming at the same instant each get a different case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from ..schema import one_row

DECISIONS = ("review", "decline")
STATES = ("open", "claimed", "resolved")
SORTS = {
    "priority": "(created_at < %(cutoff)s) DESC, rank DESC",
    "score": "score DESC, created_at",
    "amount": "amount DESC, created_at",
    "oldest": "created_at",
    "newest": "created_at DESC",
}
PAGE = 50
QUEUE_COLUMNS = (
    "transaction_id",
    "created_at",
    "user_id",
    "decision",
    "score",
    "amount",
    "merchant",
    "country",
    "reasons",
    "state",
    "assignee",
    "lease_until",
    "verdict",
    "resolved_by",
)


class FilterError(ValueError):
    """A queue filter that does not parse; the message names it."""


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """What the queue shows: every field a filter of the page, checked once here."""

    decision: str = "review"
    state: str = "open"
    reason: str = ""
    rule: str = ""
    score_min: float | None = None
    amount_min: float | None = None
    amount_max: float | None = None
    merchant: str = ""
    country: str = ""
    assignee: str = ""
    older_than_minutes: int | None = None
    breached: bool = False
    sort: str = "priority"
    page: int = 0

    @classmethod
    def parse(cls, query: dict[str, str]) -> QueueFilter:
        values: dict[str, Any] = {}  # each field's own type, checked as it is parsed
        for f in fields(cls):
            raw = query.get(f.name, "").strip()
            if not raw:
                continue
            if f.name in ("score_min", "amount_min", "amount_max"):
                values[f.name] = _number(f.name, raw, float)
            elif f.name in ("older_than_minutes", "page"):
                values[f.name] = _number(f.name, raw, int)
            elif f.name == "breached":
                values[f.name] = raw in ("1", "on", "true")
            else:
                values[f.name] = raw[:128]
        if values.get("assignee") and values.get("state", "open") == "open":
            values["state"] = "claimed"  # an open case has no assignee: whose cases means the ones they hold
        chosen = cls(**values)
        for name, allowed in (("decision", DECISIONS), ("state", STATES), ("sort", tuple(SORTS))):
            if getattr(chosen, name) not in allowed:
                raise FilterError(f"{name} must be one of {', '.join(allowed)}")
        return chosen

    def query_string(self, **changes: object) -> dict[str, str]:
        """This filter (with ``changes``) as query parameters, defaults left out, for links."""
        default = QueueFilter()
        values = {f.name: changes.get(f.name, getattr(self, f.name)) for f in fields(self)}
        return {
            name: ("1" if value is True else str(value))
            for name, value in values.items()
            if value != getattr(default, name) and value not in (None, "", False)
        }


def _number(name: str, raw: str, kind: type) -> float | int:
    try:
        value = kind(raw)
    except ValueError:
        raise FilterError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise FilterError(f"{name} must not be negative")
    return value


def _where(chosen: QueueFilter, sla: timedelta) -> tuple[str, dict]:
    now = datetime.now(UTC)  # one instant for the whole statement: the SLA's cutoff and the age filter
    clauses = ["decision = %(decision)s", "state = %(state)s"]
    params: dict[str, Any] = {"decision": chosen.decision, "state": chosen.state, "cutoff": now - sla}
    if chosen.state != "resolved":
        clauses[1] = "state <> 'resolved' AND state = %(state)s"  # the unresolved cases' partial indexes
    if chosen.reason or chosen.rule:
        clauses.append("reasons @> %(codes)s")
        params["codes"] = [code for code in (chosen.reason, chosen.rule) if code]
    for column, name, op in (
        ("score", "score_min", ">="),
        ("amount", "amount_min", ">="),
        ("amount", "amount_max", "<="),
        ("merchant", "merchant", "="),
        ("country", "country", "="),
        ("assignee", "assignee", "="),
    ):
        value = getattr(chosen, name)
        if value not in (None, ""):
            clauses.append(f"{column} {op} %({name})s")
            params[name] = value
    if chosen.older_than_minutes is not None:
        clauses.append("created_at < %(older)s")
        params["older"] = now - timedelta(minutes=chosen.older_than_minutes)
    if chosen.breached:
        clauses.append("created_at < %(cutoff)s")
    return " AND ".join(clauses), params


def rank_sql(slas: dict[str, timedelta], t: str = "") -> str:
    """The stored priority: a case's weight (score + log10(1 + amount) / 4, the amount's part
    capped at 2) in lengths of its queue's SLA (``slas``: decision -> SLA), minus its creation
    time: at any moment, ordering a queue by it is ordering by weight plus age against the SLA."""
    prefix = f"{t}." if t else ""
    seconds = " ".join(f"WHEN '{decision}' THEN {sla.total_seconds()}" for decision, sla in slas.items())
    return (
        f"({prefix}score + least(log(1 + greatest({prefix}amount, 0)), 8) / 4) * (CASE {prefix}decision {seconds} END)"
        f" - extract(epoch FROM {prefix}{'scored_at' if t else 'created_at'})"
    )


def _cutoff(sla: timedelta) -> datetime:
    """Cases created before this have breached the SLA (one instant for the whole statement)."""
    return datetime.now(UTC) - sla


def listing(conn: psycopg.Connection, chosen: QueueFilter, sla: timedelta) -> list[dict]:
    """One page of the queue, ``breached`` and ``age`` added to each case."""
    where, params = _where(chosen, sla)
    params.update(limit=PAGE, offset=chosen.page * PAGE, upto=(chosen.page + 1) * PAGE)
    columns = ", ".join(QUEUE_COLUMNS)
    if chosen.sort == "priority" and chosen.state != "resolved":
        # Breached first, then by priority: each side is read from the rank index, never the whole
        # queue sorted. A case within the SLA ranks at most the heaviest weight there is, in SLAs,
        # minus the cutoff, so that side starts there instead of walking past every breached case
        # above it; a filter that only breached cases pass (breached, older than the SLA) skips it.
        part = f"SELECT {columns}, rank FROM cases WHERE {where} AND {{}} ORDER BY rank DESC LIMIT %(upto)s"
        rows = f"({part.format('created_at < %(cutoff)s')})"
        if not chosen.breached and params.get("older", params["cutoff"]) >= params["cutoff"]:
            rows += f" UNION ALL ({part.format('created_at >= %(cutoff)s AND rank <= %(fresh_rank)s')})"
            heaviest = _heaviest(conn, chosen.decision, chosen.state)
            params["fresh_rank"] = heaviest * sla.total_seconds() - params["cutoff"].timestamp() + 1  # a second more: rounding
        order = "created_at < %(cutoff)s DESC, rank DESC"
    else:
        rows = f"SELECT {columns}, resolved_at FROM cases WHERE {where}"
        order = "resolved_at DESC" if chosen.sort == "priority" else SORTS[chosen.sort]
    # Never prepared, so planned for this request's values: a generic plan, which PostgreSQL may
    # settle on for a statement prepared five times, ignores the cutoff and weight bounds the
    # index walks rely on (python -m bench console: the amount filter's page 37 ms instead of 4).
    cursor = conn.execute(
        f"""SELECT {columns}, created_at < %(cutoff)s, clock_timestamp() - created_at
            FROM ({rows}) q ORDER BY {order} LIMIT %(limit)s OFFSET %(offset)s""",
        params,
        prepare=False,
    )
    return [dict(zip((*QUEUE_COLUMNS, "breached", "age"), row)) for row in cursor.fetchall()]


def _heaviest(conn: psycopg.Connection, decision: str, state: str) -> float:
    """An upper bound of the weight (see ``rank_sql``) of the queue's unresolved cases in ``state``:
    its largest score plus its largest amount's part, each the first entry of its index."""
    cases = "FROM cases WHERE decision = %(decision)s AND state <> 'resolved' AND state = %(state)s"
    score, amount = one_row(
        conn.execute(f"SELECT (SELECT max(score) {cases}), (SELECT max(amount) {cases})", {"decision": decision, "state": state})
    )
    if score is None:
        return 0.0
    return score + min(math.log10(1 + max(amount, 0)), 8) / 4


COUNTS = ("open", "claimed", "breached", "resolved_24h")


def tally(conn: psycopg.Connection, decision: str, sla: timedelta) -> dict:
    """Cases per state of one queue, counted now: open, claimed, breached (unresolved past the SLA),
    resolved in the last 24 hours, and when the newest was created."""
    row = one_row(
        conn.execute(
            """SELECT count(*) FILTER (WHERE state = 'open'), count(*) FILTER (WHERE state = 'claimed'),
                  count(*) FILTER (WHERE created_at < %(cutoff)s),
                  (SELECT count(*) FROM cases WHERE state = 'resolved' AND decision = %(decision)s
                      AND resolved_at > clock_timestamp() - interval '24 hours'),
                  max(created_at)
           FROM cases WHERE state <> 'resolved' AND decision = %(decision)s""",
            {"decision": decision, "cutoff": _cutoff(sla)},
        )
    )
    return {**dict(zip(COUNTS, row[:4])), "newest": row[4]}


def store_tallies(conn: psycopg.Connection, slas: dict[str, timedelta]) -> dict[str, dict]:
    """Count every queue against its SLA (``tally``) and keep the counts in ``console_queue_counts``,
    where pages read them: counting tens of thousands of cases once every few seconds, not on every page."""
    tallies = {decision: tally(conn, decision, slas[decision]) for decision in DECISIONS}
    with conn.cursor() as cursor:
        cursor.executemany(
            """INSERT INTO console_queue_counts (decision, open, claimed, breached, resolved_24h, newest, counted_at)
               VALUES (%(decision)s, %(open)s, %(claimed)s, %(breached)s, %(resolved_24h)s, %(newest)s, clock_timestamp())
               ON CONFLICT (decision) DO UPDATE SET open = EXCLUDED.open, claimed = EXCLUDED.claimed,
                   breached = EXCLUDED.breached, resolved_24h = EXCLUDED.resolved_24h, newest = EXCLUDED.newest,
                   counted_at = EXCLUDED.counted_at""",
            [{"decision": decision, **counted} for decision, counted in tallies.items()],
        )
    return tallies


def counts(conn: psycopg.Connection, decision: str) -> dict:
    """The counts of one queue as the housekeeping last stored them (zeros before its first pass)."""
    row = conn.execute(
        "SELECT open, claimed, breached, resolved_24h, newest FROM console_queue_counts WHERE decision = %s", (decision,)
    ).fetchone()
    return {**dict(zip(COUNTS, row[:4])), "newest": row[4]} if row else {**dict.fromkeys(COUNTS, 0), "newest": None}


def oldest_open_ages(conn: psycopg.Connection) -> dict[str, float]:
    """Per queue, the age in seconds of its oldest open (unclaimed) case, 0 without one: what the SLA
    alert compares with that queue's SLA. Each is the first entry of the queue's ``cases_created`` index."""
    rows = conn.execute(
        """SELECT d, extract(epoch FROM clock_timestamp() - (
               SELECT min(created_at) FROM cases WHERE decision = d AND state <> 'resolved' AND state = 'open'))
           FROM unnest(%s::text[]) d""",
        (list(DECISIONS),),
    ).fetchall()
    return {decision: float(age or 0.0) for decision, age in rows}


def claim_next(conn: psycopg.Connection, username: str, decision: str, sla: timedelta, lease: timedelta) -> str | None:
    """Lock the highest-priority claimable case of the ``decision`` queue for ``username``; its id, or None.

    One statement: the best breached case, or when there is none the best other one, each read in
    rank order and locked with SKIP LOCKED, so concurrent claimers pass over each other's rows."""
    claimable = "state <> 'resolved' AND decision = %(decision)s AND (state = 'open' OR lease_until < clock_timestamp())"
    row = conn.execute(
        f"""WITH breached AS (
                SELECT transaction_id FROM cases WHERE {claimable} AND created_at < %(cutoff)s
                ORDER BY rank DESC LIMIT 1 FOR UPDATE SKIP LOCKED),
            fresh AS (
                SELECT transaction_id FROM cases WHERE {claimable} AND created_at >= %(cutoff)s
                  AND NOT EXISTS (SELECT FROM breached)
                ORDER BY rank DESC LIMIT 1 FOR UPDATE SKIP LOCKED),
            next AS (SELECT transaction_id FROM breached UNION ALL SELECT transaction_id FROM fresh)
            UPDATE cases c SET state = 'claimed', assignee = %(user)s, claimed_at = clock_timestamp(),
                               lease_until = clock_timestamp() + %(lease)s
            FROM next WHERE c.transaction_id = next.transaction_id
            RETURNING c.transaction_id""",
        {"decision": decision, "cutoff": _cutoff(sla), "user": username, "lease": lease},
    ).fetchone()
    return None if row is None else row[0]


def claim(conn: psycopg.Connection, transaction_id: str, username: str, lease: timedelta, override: bool = False) -> str | None:
    """Claim (or renew) one case for ``username``: when it is open, already theirs, its lease ran out,
    or ``override`` (a lead reassigning). Returns the previous assignee ("" when none), None when refused."""
    row = conn.execute(
        """UPDATE cases c SET state = 'claimed', assignee = %(user)s, lease_until = clock_timestamp() + %(lease)s,
                  claimed_at = CASE WHEN c.assignee IS DISTINCT FROM %(user)s THEN clock_timestamp() ELSE c.claimed_at END
           FROM (SELECT transaction_id, assignee FROM cases WHERE transaction_id = %(id)s FOR UPDATE) old
           WHERE c.transaction_id = old.transaction_id AND c.state <> 'resolved'
             AND (c.state = 'open' OR c.assignee = %(user)s OR c.lease_until < clock_timestamp() OR %(override)s)
           RETURNING coalesce(old.assignee, '')""",
        {"id": transaction_id, "user": username, "lease": lease, "override": override},
    ).fetchone()
    return None if row is None else row[0]


def release(conn: psycopg.Connection, transaction_id: str, username: str) -> bool:
    """Put ``username``'s claimed case back in the queue; False when it was not theirs."""
    return bool(
        conn.execute(
            """UPDATE cases SET state = 'open', assignee = NULL, lease_until = NULL, claimed_at = NULL
               WHERE transaction_id = %s AND state = 'claimed' AND assignee = %s""",
            (transaction_id, username),
        ).rowcount
    )


def expire_leases(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """Return every case whose lease ran out to the queue; (transaction_id, former assignee) of each."""
    return conn.execute(
        """UPDATE cases c SET state = 'open', assignee = NULL, lease_until = NULL, claimed_at = NULL
           FROM (SELECT transaction_id, assignee FROM cases
                 WHERE state = 'claimed' AND lease_until < clock_timestamp() FOR UPDATE SKIP LOCKED) old
           WHERE c.transaction_id = old.transaction_id
           RETURNING c.transaction_id, old.assignee"""
    ).fetchall()
