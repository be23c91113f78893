"""SQL of the audit trail (``console_audit``, append-only: a trigger refuses changes).

Every action lands here with who, when, what and before/after: sign-ins (and failed ones, which
the login throttle counts), claims, releases, verdicts, blocks, notes, bulk actions, user changes
and refused requests. The export adds the rules' own trail.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime, timedelta

import orjson
import psycopg
from psycopg.types.json import Jsonb

from ..schema import one_row

COLUMNS = ("id", "at", "actor", "action", "transaction_id", "subject", "before", "after", "address")


def record(
    conn: psycopg.Connection,
    actor: str,
    action: str,
    transaction_id: str | None = None,
    subject: str | None = None,
    before: object = None,
    after: object = None,
    address: str | None = None,
) -> None:
    conn.execute(
        """INSERT INTO console_audit (actor, action, transaction_id, subject, before, after, address)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (
            actor,
            action,
            transaction_id,
            subject,
            None if before is None else Jsonb(before),
            None if after is None else Jsonb(after),
            address,
        ),
    )


def for_case(conn: psycopg.Connection, transaction_id: str) -> list[dict]:
    cursor = conn.execute(
        "SELECT " + ", ".join(COLUMNS) + " FROM console_audit WHERE transaction_id = %s ORDER BY at, id", (transaction_id,)
    )
    return [dict(zip(COLUMNS, row)) for row in cursor.fetchall()]


def failed_logins(conn: psycopg.Connection, username: str, window: timedelta) -> int:
    """Failed sign-ins of ``username`` within ``window``: what the login throttle counts."""
    return one_row(
        conn.execute(
            "SELECT count(*) FROM console_audit WHERE action = 'login_failed' AND subject = %s AND at > clock_timestamp() - %s",
            (username, window),
        )
    )[0]


# The export's rows: the console's trail and the rules' (``rules_audit``: every rule-set change,
# from the console or ``fraudd rules``), told apart by ``trail``, so one file answers an auditor.
EXPORT_COLUMNS = ("trail", *COLUMNS)
_EXPORT = f"""
    SELECT 'console', {", ".join(COLUMNS)} FROM console_audit WHERE %(since)s::timestamptz IS NULL OR at >= %(since)s
    UNION ALL
    SELECT 'rules', id, at, actor, action, NULL, 'rule set ' || version, NULL, detail, NULL
      FROM rules_audit WHERE %(since)s::timestamptz IS NULL OR at >= %(since)s
    ORDER BY at, 1, id"""


def export_csv(conn: psycopg.Connection, since: datetime | None = None) -> Iterator[str]:
    """Both trails (from ``since``) as CSV text chunks, oldest first, read by a server-side cursor."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    with conn.transaction(), conn.cursor(name="audit_export") as cursor:
        cursor.execute(_EXPORT, {"since": since})
        for rows in iter(lambda: cursor.fetchmany(1000), []):
            for row in rows:
                writer.writerow([_cell(value) for value in row])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return "" if value is None else value
