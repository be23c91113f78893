"""The rule sets in PostgreSQL (``rule_sets``) and the audit of every action on them (``rules_audit``).

A version is immutable once imported; only its status moves (draft -> shadow -> live -> retired).
Every change of status happens in one transaction with its audit row, under an advisory lock, so two
operators publishing at once take turns and the table never holds two live sets. What the workers
decide with follows the Redis pointer (``pointer.py``) that the caller sets after the commit.

``fraudd rules`` and the console's rules page call the same functions here, so both enforce who
may change what is live (``authorize``, maker-checker in ``publish``) with one rule, and a refusal
is audited the same way from either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from fraudd.schema import one_row
from fraudd.scoring.rules import Rules

STATUSES = ("draft", "shadow", "live", "retired")
# The console roles (``console_users``) that may change what is live: publish, shadow, roll back.
PUBLISHER_ROLES = ("lead", "admin")
_LOCK = 0x72756C6573  # "rules": one number every publisher agrees on


class RuleSetError(RuntimeError):
    """An action on rule sets is refused; the message says why, in one line for the operator."""


class Refused(RuleSetError):
    """This actor may not take this action (not a publisher, or the version's own author): audited
    as ``refused``; the console answers 403."""


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: int
    source: str
    digest: str
    status: str
    author: str
    note: str
    created_at: datetime

    def rules(self) -> Rules:
        return Rules.from_bytes(self.source.encode(), source=f"rule set {self.version}", version=str(self.version))


_COLUMNS = "version, source, digest, status, author, note, created_at"


def audit(conn: psycopg.Connection, actor: str, action: str, version: int | None, **detail: object) -> None:
    conn.execute(
        "INSERT INTO rules_audit (actor, action, version, detail) VALUES (%s, %s, %s, %s)",
        (actor, action, version, Jsonb(detail)),
    )


def validate(source: str, where: str) -> Rules:
    """The rules of ``source``, or RulesError naming ``where`` and the rule at fault: the one check a
    draft passes, whether imported from a file or typed in the console."""
    return Rules.from_bytes(source.encode(), source=where)


def import_draft(conn: psycopg.Connection, source: str, actor: str, note: str = "", where: str = "imported rules") -> RuleSet:
    """Validate ``source`` (raises RulesError naming ``where`` and the rule) and store it as a new draft."""
    validate(source, where)
    with conn.transaction():
        row = conn.execute(
            f"INSERT INTO rule_sets (source, digest, author, note) VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}",
            (source, hashlib.sha256(source.encode()).hexdigest()[:12], actor, note),
        ).fetchone()
        assert row is not None  # INSERT ... RETURNING returns the row it inserted
        draft = RuleSet(*row)
        audit(conn, actor, "import", draft.version, digest=draft.digest, note=note)
    return draft


def get(conn: psycopg.Connection, version: int) -> RuleSet:
    row = conn.execute(f"SELECT {_COLUMNS} FROM rule_sets WHERE version = %s", (version,)).fetchone()
    if row is None:
        raise RuleSetError(f"no rule set version {version}")
    return RuleSet(*row)


def list_sets(conn: psycopg.Connection) -> list[RuleSet]:
    return [RuleSet(*row) for row in conn.execute(f"SELECT {_COLUMNS} FROM rule_sets ORDER BY version")]


def publishers(conn: psycopg.Connection) -> dict[int, str]:
    """Who last made each version live (publish or rollback), for the versions that ever were."""
    rows = conn.execute(
        """SELECT DISTINCT ON (version) version, actor FROM rules_audit
           WHERE action IN ('publish', 'rollback') ORDER BY version, id DESC"""
    ).fetchall()
    return dict(rows)


def history(conn: psycopg.Connection, version: int) -> list[tuple[datetime, str, str, dict]]:
    """(at, actor, action, detail) of every audited action on ``version``, oldest first."""
    return conn.execute("SELECT at, actor, action, detail FROM rules_audit WHERE version = %s ORDER BY id", (version,)).fetchall()


def current(conn: psycopg.Connection) -> tuple[RuleSet | None, RuleSet | None]:
    """(live, shadow): the sets the workers decide with and run beside it, None where there is none."""
    found = {
        row[3]: RuleSet(*row) for row in conn.execute(f"SELECT {_COLUMNS} FROM rule_sets WHERE status IN ('live', 'shadow')")
    }
    return found.get("live"), found.get("shadow")


def was_live(conn: psycopg.Connection, version: int) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM rules_audit WHERE version = %s AND action IN ('publish', 'rollback'))", (version,)
    ).fetchone()
    assert row is not None  # SELECT EXISTS returns one row
    return bool(row[0])


def authorize(conn: psycopg.Connection, actor: str) -> None:
    """Raise Refused unless ``actor`` may change what is live.

    Where the console has users (``console_users``), the actor must be one of them, active, with a
    role in PUBLISHER_ROLES, whether they act in the console or through ``fraudd rules --actor``;
    where it has none (a team without the console), the actor is whoever the operator names."""
    if one_row(conn.execute("SELECT to_regclass('console_users') IS NULL"))[0]:  # a store older than the console
        return
    users, allowed = one_row(
        conn.execute(
            """SELECT count(*), coalesce(bool_or(username = %s AND NOT disabled AND role = ANY(%s)), false)
               FROM console_users""",
            (actor, list(PUBLISHER_ROLES)),
        )
    )
    if users and not allowed:
        raise Refused(f"{actor} is not an active {' or '.join(PUBLISHER_ROLES)} among the console's users")


@contextmanager
def _audited_refusal(conn: psycopg.Connection, actor: str, action: str, version: int | None) -> Iterator[None]:
    """Record a refusal of ``action`` (after its transaction rolled back), then let it raise."""
    try:
        yield
    except Refused as exc:
        audit(conn, actor, "refused", version, refused=action, why=str(exc))
        raise


def publish(
    conn: psycopg.Connection, version: int, actor: str, allow_self_approve: bool = False, rollback: bool = False
) -> RuleSet:
    """Make ``version`` the live set (the live one retires); audited.

    Maker-checker: the actor must be a publisher (``authorize``) and not the draft's author, unless
    ``allow_self_approve`` (a one-person team), which the audit row records. A rollback goes back to
    a version that was live before, and so was checked when it was first published."""
    with _audited_refusal(conn, actor, "rollback" if rollback else "publish", version), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        target = get(conn, version)
        authorize(conn, actor)
        if rollback and not was_live(conn, version):
            raise RuleSetError(
                f"rule set {version} was never live: publish it instead (a rollback returns to an earlier live set)"
            )
        if target.status == "live":
            raise RuleSetError(f"rule set {version} is already live")
        self_approved = target.author == actor
        if self_approved and not rollback and not allow_self_approve:
            raise Refused(
                f"rule set {version} was written by {actor}: another person must publish it (maker-checker); "
                "on a one-person team its author may, with --allow-self-approve (in the console: the box beside Publish)"
            )
        target.rules()  # stored sets were validated on import; a newer fraudd may know fewer features
        conn.execute("UPDATE rule_sets SET status = 'retired' WHERE status = 'live'")
        conn.execute("UPDATE rule_sets SET status = 'live' WHERE version = %s", (version,))
        previous = conn.execute(
            "SELECT version FROM rules_audit WHERE action IN ('publish', 'rollback') ORDER BY id DESC LIMIT 1"
        ).fetchone()
        audit(
            conn,
            actor,
            "rollback" if rollback else "publish",
            version,
            author=target.author,
            self_approved=self_approved,
            previous=None if previous is None else previous[0],
        )
    return get(conn, version)


def shadow(conn: psycopg.Connection, version: int, actor: str) -> RuleSet:
    """Run ``version`` in shadow beside the live set (replacing any other shadow set); audited."""
    with _audited_refusal(conn, actor, "shadow", version), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        target = get(conn, version)
        authorize(conn, actor)
        if target.status == "live":
            raise RuleSetError(f"rule set {version} is live: only another version can run in shadow")
        conn.execute("UPDATE rule_sets SET status = 'retired' WHERE status = 'shadow' AND version <> %s", (version,))
        conn.execute("UPDATE rule_sets SET status = 'shadow' WHERE version = %s", (version,))
        audit(conn, actor, "shadow", version)
    return get(conn, version)


def unshadow(conn: psycopg.Connection, actor: str) -> int | None:
    """Stop the shadow set, if any; returns its version."""
    with _audited_refusal(conn, actor, "unshadow", None), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        authorize(conn, actor)
        row = conn.execute("UPDATE rule_sets SET status = 'retired' WHERE status = 'shadow' RETURNING version").fetchone()
        if row is not None:
            audit(conn, actor, "unshadow", row[0])
    return None if row is None else row[0]
