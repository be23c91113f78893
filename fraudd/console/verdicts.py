"""A verdict, whole: the case resolved once, its label stored, the scoring taught, blocks, audit.

Runs on one pooled connection inside its transaction: the PostgreSQL writes come first, then the
confirmed-fraud counts and the blocklists in Redis, and the transaction commits last, so a Redis
failure leaves neither the case resolved nor a label without its effect on the scoring (the
analyst sees the error and tries again; both Redis writes are idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis
from redis.cluster import RedisCluster

from ..learning.labels import confirm, confirmed_shards
from ..scoring.rules import block
from . import audit, cases
from .cases import Resolved, VerdictRefused

# What an analyst may block with a Fraud verdict: the rules' live blocklists of the transaction's own values.
BLOCKABLE = {"device": "device_id", "ip": "ip", "card": "card_id"}


@dataclass(frozen=True, slots=True)
class Teacher:
    """Where verdicts teach the scoring: the input stream's shards in Redis."""

    client: redis.Redis | RedisCluster
    stream: str
    shards: int

    def confirm(self, conn: psycopg.Connection, resolved: list[Resolved]) -> None:
        confirm(conn, confirmed_shards(self.client, self.stream, self.shards), [r.label for r in resolved])

    def block(self, kind: str, value: str) -> bool:
        return block(self.client, self.stream, self.shards, kind, value)


def give(
    conn: psycopg.Connection,
    teacher: Teacher,
    transaction_id: str,
    username: str,
    verdict: str,
    typology: str = "",
    note: str = "",
    blocks: tuple[str, ...] = (),
    address: str | None = None,
) -> Resolved:
    """One analyst's verdict on one case; raises VerdictRefused saying why it cannot be given."""
    row = conn.execute(
        "SELECT state, assignee, verdict, lease_until > clock_timestamp(), event_time FROM cases WHERE transaction_id = %s",
        (transaction_id,),
    ).fetchone()
    if row is None:
        raise VerdictRefused("no such case")
    state, assignee, previous, leased, event_time = row
    resolved = cases.resolve(conn, [transaction_id], username, verdict, typology)
    if not resolved:
        if state == "resolved":
            raise VerdictRefused(f"this case was resolved already ({cases.VERDICTS[previous]})")
        raise VerdictRefused(f"{assignee} holds this case" if leased else "the case changed; reload it")
    audit.record(
        conn,
        username,
        "verdict",
        transaction_id,
        before={"state": state, "assignee": assignee},
        after={"verdict": verdict, "typology": typology or None, "source": f"console:{username}"},
        address=address,
    )
    if note:
        cases.add_note(conn, transaction_id, username, note)
        audit.record(conn, username, "note", transaction_id, after={"body": note}, address=address)
    teacher.confirm(conn, resolved)
    if verdict == "fraud" and blocks:
        columns = tuple(BLOCKABLE.values())
        transaction = conn.execute(
            f"SELECT {', '.join(columns)} FROM transactions WHERE transaction_id = %s AND event_time = %s",
            (transaction_id, event_time),
        ).fetchone()
        values = dict(zip(columns, transaction or ()))
        for kind in blocks:
            value = values.get(BLOCKABLE[kind])
            if value:
                added = teacher.block(kind, value)
                audit.record(
                    conn,
                    username,
                    "block",
                    transaction_id,
                    subject=f"{kind}:{value}",
                    before={"blocked": not added},
                    after={"blocked": True, "why": note or f"fraud verdict on {transaction_id}"},
                    address=address,
                )
    return resolved[0]


def give_bulk(
    conn: psycopg.Connection, teacher: Teacher, transaction_ids: list[str], username: str, address: str | None = None
) -> list[Resolved]:
    """A lead's ``Legitimate`` on many open cases at once (claimed ones are left to their analysts)."""
    resolved = cases.resolve(conn, transaction_ids, username, "legit", claimed_only=False)
    audit.record(
        conn,
        username,
        "bulk_verdict",
        subject=f"{len(resolved)} of {len(transaction_ids)} cases",
        after={"verdict": "legit", "transaction_ids": [r.transaction_id for r in resolved]},
        address=address,
    )
    teacher.confirm(conn, resolved)
    return resolved
