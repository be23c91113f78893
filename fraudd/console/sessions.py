"""SQL of sign-in sessions (``console_sessions``).

The cookie holds a random token; the table holds only its SHA-256, the session's CSRF token and
when it was last used. Looking a session up refuses one idle longer than the timeout or belonging
to a disabled user, and renews it when its last use is a minute old.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

import psycopg

from .users import User

RENEW_AFTER = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    csrf_token: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(conn: psycopg.Connection, username: str) -> str:
    """A new session of ``username``; returns the cookie's token."""
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO console_sessions (token_hash, username, csrf_token) VALUES (%s, %s, %s)",
        (_digest(token), username, secrets.token_urlsafe(32)),
    )
    return token


def current(conn: psycopg.Connection, token: str, idle: timedelta) -> Session | None:
    """The live session of ``token``; None when unknown, idle too long or its user disabled. Its
    ``last_seen`` is renewed at most once a minute: a page view is a read, not a write and a commit."""
    digest = _digest(token)
    row = conn.execute(
        """SELECT u.username, u.role, u.disabled, u.created_at, s.csrf_token, s.last_seen < clock_timestamp() - %s
           FROM console_sessions s JOIN console_users u USING (username)
           WHERE s.token_hash = %s AND s.last_seen > clock_timestamp() - %s AND NOT u.disabled""",
        (RENEW_AFTER, digest, idle),
    ).fetchone()
    if row is None:
        return None
    if row[5]:
        conn.execute("UPDATE console_sessions SET last_seen = clock_timestamp() WHERE token_hash = %s", (digest,))
    return Session(User(*row[:4]), row[4])


def end(conn: psycopg.Connection, token: str) -> None:
    conn.execute("DELETE FROM console_sessions WHERE token_hash = %s", (_digest(token),))


def expire(conn: psycopg.Connection, idle: timedelta) -> int:
    """Delete the sessions idle longer than ``idle``; returns how many."""
    return conn.execute("DELETE FROM console_sessions WHERE last_seen < clock_timestamp() - %s", (idle,)).rowcount
