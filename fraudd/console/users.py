"""SQL of the console's users (``console_users``): who may sign in, with which role.

The one home of user changes, for ``fraudd users`` and the console's users page alike: each is
audited with before and after, ends the user's sessions where it changes what they may do, and
none leaves the console without an active admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from . import audit

ROLES = ("analyst", "lead", "admin")
# Locked (in one order) by every user change: see ``_update``.
ACTIVE_ADMINS = "SELECT username FROM console_users WHERE role = 'admin' AND NOT disabled ORDER BY username FOR UPDATE"


@dataclass(frozen=True, slots=True)
class User:
    username: str
    role: str
    disabled: bool
    created_at: datetime

    def may(self, role: str) -> bool:
        """Whether this user holds ``role`` or a stronger one (admin > lead > analyst)."""
        return ROLES.index(self.role) >= ROLES.index(role)


class UserError(ValueError):
    """A user change that cannot be made; the message says why."""


def add(conn: psycopg.Connection, actor: str, username: str, role: str, password_hash: str, address: str | None = None) -> None:
    """Add ``username`` with ``role``, audited (``user_added``) as ``actor``'s."""
    if role not in ROLES:
        raise UserError(f"a role is one of {', '.join(ROLES)}")
    try:
        conn.execute(
            "INSERT INTO console_users (username, role, password_hash) VALUES (%s, %s, %s)", (username, role, password_hash)
        )
    except psycopg.errors.UniqueViolation:
        raise UserError(f"user {username} exists already") from None
    except psycopg.errors.CheckViolation:
        raise UserError("a username is 1-64 letters, digits, '.', '_', '@' or '-'") from None
    audit.record(conn, actor, "user_added", subject=username, after={"role": role, "disabled": False}, address=address)


def all_users(conn: psycopg.Connection) -> list[User]:
    rows = conn.execute("SELECT username, role, disabled, created_at FROM console_users ORDER BY username").fetchall()
    return [User(*row) for row in rows]


def password_hash(conn: psycopg.Connection, username: str) -> tuple[User, str] | None:
    """The user and their stored hash, for signing in (a disabled user is returned too: the caller refuses)."""
    row = conn.execute(
        "SELECT username, role, disabled, created_at, password_hash FROM console_users WHERE username = %s", (username,)
    ).fetchone()
    return None if row is None else (User(*row[:4]), row[4])


def disable(conn: psycopg.Connection, actor: str, username: str, address: str | None = None) -> None:
    """Disable ``username``: their sessions end and they cannot sign in (never the last active admin)."""
    _update(conn, actor, "user_disabled", username, address, disabled=True)


def enable(conn: psycopg.Connection, actor: str, username: str, address: str | None = None) -> None:
    _update(conn, actor, "user_enabled", username, address, disabled=False)


def set_role(conn: psycopg.Connection, actor: str, username: str, role: str, address: str | None = None) -> None:
    """Give ``username`` the ``role``; their sessions end (never the last active admin's demotion)."""
    if role not in ROLES:
        raise UserError(f"a role is one of {', '.join(ROLES)}")
    _update(conn, actor, "role_changed", username, address, role=role)


def set_password(conn: psycopg.Connection, actor: str, username: str, password_hash: str, address: str | None = None) -> None:
    _update(conn, actor, "password_changed", username, address, password_hash=password_hash)


def _update(conn: psycopg.Connection, actor: str, action: str, username: str, address: str | None, **changes: object) -> None:
    """Set ``changes`` (role, disabled, password_hash) on ``username``, end their sessions and audit
    ``action`` with before and after.

    The active admins' rows are locked first, always in the same order, so two admins disabling
    each other at once are serialized and the second finds the first gone: a change that would
    leave no active admin is refused."""
    admins = [row[0] for row in conn.execute(ACTIVE_ADMINS).fetchall()]
    row = conn.execute("SELECT role, disabled FROM console_users WHERE username = %s FOR UPDATE", (username,)).fetchone()
    if row is None:
        raise UserError(f"no user {username}")
    before = {"role": row[0], "disabled": row[1]}
    after = {**before, **{name: value for name, value in changes.items() if name != "password_hash"}}
    if admins == [username] and (after["role"] != "admin" or after["disabled"]):
        raise UserError(f"{username} is the last active admin: make another user admin first")
    names = sorted(changes)
    conn.execute(
        "UPDATE console_users SET " + ", ".join(f"{name} = %s" for name in names) + " WHERE username = %s",
        (*[changes[name] for name in names], username),
    )
    conn.execute("DELETE FROM console_sessions WHERE username = %s", (username,))
    audit.record(conn, actor, action, subject=username, before=before, after=after, address=address)
