"""SQL of the console's users (``console_users``): who may sign in, with which role."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

ROLES = ("analyst", "lead", "admin")


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


def add(conn: psycopg.Connection, username: str, role: str, password_hash: str) -> None:
    try:
        conn.execute(
            "INSERT INTO console_users (username, role, password_hash) VALUES (%s, %s, %s)", (username, role, password_hash)
        )
    except psycopg.errors.UniqueViolation:
        raise UserError(f"user {username} exists already") from None
    except psycopg.errors.CheckViolation:
        raise UserError("a username is 1-64 letters, digits, '.', '_', '@' or '-'") from None


def all_users(conn: psycopg.Connection) -> list[User]:
    rows = conn.execute("SELECT username, role, disabled, created_at FROM console_users ORDER BY username").fetchall()
    return [User(*row) for row in rows]


def password_hash(conn: psycopg.Connection, username: str) -> tuple[User, str] | None:
    """The user and their stored hash, for signing in (a disabled user is returned too: the caller refuses)."""
    row = conn.execute(
        "SELECT username, role, disabled, created_at, password_hash FROM console_users WHERE username = %s", (username,)
    ).fetchone()
    return None if row is None else (User(*row[:4]), row[4])


def update(conn: psycopg.Connection, username: str, **changes: object) -> tuple[dict, dict]:
    """Set ``changes`` (role, disabled, password_hash) on ``username``; returns (before, after) for the audit.
    Disabling a user or changing their role ends their sessions."""
    names = sorted(changes)
    row = conn.execute("SELECT role, disabled FROM console_users WHERE username = %s FOR UPDATE", (username,)).fetchone()
    if row is None:
        raise UserError(f"no user {username}")
    before = {"role": row[0], "disabled": row[1]}
    conn.execute(
        "UPDATE console_users SET " + ", ".join(f"{name} = %s" for name in names) + " WHERE username = %s",
        (*[changes[name] for name in names], username),
    )
    conn.execute("DELETE FROM console_sessions WHERE username = %s", (username,))
    after = {**before, **{name: changes[name] for name in names if name != "password_hash"}}
    return before, after
