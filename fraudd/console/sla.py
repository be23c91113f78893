"""SQL of the queues' SLAs (``console_slas``): what a lead sets per queue, --sla-minutes until then.

A queue's SLA drives its priority (``cases.rank`` is stored in lengths of it) and what counts as
breached. A change therefore re-ranks the queue's unresolved cases and recounts the queues in the
same transaction, so every page, claim and count uses the new SLA from its commit on. The
housekeeping reads the SLAs with a share lock while it ranks new cases (``hold``): a change waits
for it and it for a change, so no case is ranked against an SLA that is no longer the queue's.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg

from ..schema import one_row
from . import audit, cases, queue
from .queue import DECISIONS

MAX_MINUTES = 7 * 24 * 60


class SlaError(ValueError):
    """An SLA that may not be set; the message says why."""


def parse_minutes(raw: str) -> timedelta:
    """An SLA as a lead types it: whole minutes, from 1 to a week."""
    try:
        minutes = int(raw.strip())
    except ValueError:
        raise SlaError(f"an SLA is a whole number of minutes, got {raw[:20]!r}") from None
    if not 1 <= minutes <= MAX_MINUTES:
        raise SlaError(f"an SLA is from 1 to {MAX_MINUTES} minutes (a week)")
    return timedelta(minutes=minutes)


def current(conn: psycopg.Connection, default: timedelta, hold: bool = False) -> dict[str, timedelta]:
    """Each queue's SLA (``default``, the console's --sla-minutes, where no lead set one); with
    ``hold``, a change waits until the caller's transaction ends."""
    stored: dict[str, timedelta | None] = dict(
        conn.execute("SELECT decision, sla FROM console_slas" + (" FOR SHARE" if hold else "")).fetchall()
    )
    return {decision: stored.get(decision) or default for decision in DECISIONS}


def queues(conn: psycopg.Connection, default: timedelta) -> list[dict]:
    """What the SLA page shows per queue: its SLA, and who set it when (None: the default)."""
    rows = {row[0]: row[1:] for row in conn.execute("SELECT decision, sla, changed_by, changed_at FROM console_slas")}
    return [
        {
            "decision": decision,
            "sla": rows[decision][0] or default,
            "changed_by": rows[decision][1],
            "changed_at": rows[decision][2],
        }
        for decision in DECISIONS
    ]


def change(
    conn: psycopg.Connection, decision: str, sla: timedelta, default: timedelta, actor: str, address: str | None = None
) -> None:
    """Set the ``decision`` queue's SLA, re-rank its unresolved cases, recount the queues and audit
    it (``sla_changed``, before and after in minutes)."""
    if decision not in DECISIONS:
        raise SlaError(f"no {decision!r} queue")
    before: timedelta = one_row(conn.execute("SELECT sla FROM console_slas WHERE decision = %s FOR UPDATE", (decision,)))[0]
    conn.execute(
        "UPDATE console_slas SET sla = %s, changed_by = %s, changed_at = clock_timestamp() WHERE decision = %s",
        (sla, actor, decision),
    )
    cases.rerank(conn, {decision: sla})
    queue.store_tallies(conn, current(conn, default))
    audit.record(
        conn,
        actor,
        "sla_changed",
        subject=decision,
        before={"sla_minutes": _minutes(before or default)},
        after={"sla_minutes": _minutes(sla)},
        address=address,
    )


def _minutes(sla: timedelta) -> int:
    return round(sla.total_seconds() / 60)
