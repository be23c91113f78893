"""Versioned SQL migrations from ``schema/`` and the upkeep of time partitions.

Each file ``NNN_name.sql`` is applied once, in its own transaction, and recorded with its checksum
in ``fraudd_schema_migrations``; a concurrent ``fraudd migrate`` waits on an advisory lock instead
of racing. Running it again is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
_MIGRATION_LOCK = 0x6672617564  # "fraud": one number all fraudd migrators agree on


class MigrationError(RuntimeError):
    """A migration file was edited after it was applied, or failed to apply."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = SCHEMA_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        version = int(path.name[:3])
        migrations.append(Migration(version, path.stem, path.read_text()))
    return migrations


def connect(url: str, pg_schema: str, **kwargs) -> psycopg.Connection:
    """A connection whose unqualified names (``transactions``, …) resolve in ``pg_schema``.

    The search path is a connection option, so every fraudd connection gets it the same way and
    without a round trip of its own.
    """
    return psycopg.connect(url, options=f"-c search_path={pg_schema}", **kwargs)


async def connect_async(url: str, pg_schema: str, **kwargs) -> psycopg.AsyncConnection:
    """``connect`` for asyncio code (the HTTP ingest)."""
    return await psycopg.AsyncConnection.connect(url, options=f"-c search_path={pg_schema}", **kwargs)


def migrate(conn: psycopg.Connection, pg_schema: str, partition_days_ahead: int = 7) -> list[str]:
    """Apply pending migrations and create the coming days' partitions. Returns what was applied.

    ``conn`` comes from ``connect(url, pg_schema)``: the schema is created here if missing.
    """
    conn.autocommit = True
    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{pg_schema}"')
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS fraudd_schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = dict(conn.execute("SELECT version, checksum FROM fraudd_schema_migrations").fetchall())
        done = []
        for migration in load_migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"schema/{migration.name}.sql changed after it was applied; add a new migration instead"
                    )
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO fraudd_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            log.info("migration applied", extra={"event": "migration_applied", "migration": migration.name})
            done.append(migration.name)
        ensure_partitions(conn, partition_days_ahead)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def ensure_partitions(conn: psycopg.Connection, days_ahead: int) -> int:
    """Create daily partitions from yesterday to ``days_ahead`` days out; returns how many were new."""
    today = datetime.now(timezone.utc).date()
    first, last = today - timedelta(days=1), today + timedelta(days=days_ahead)
    row = conn.execute("SELECT fraudd_ensure_partitions(%s, %s)", (first, last)).fetchone()
    return int(row[0])


def pending_migrations(conn: psycopg.Connection) -> list[str]:
    """Names of migrations not yet applied (the daemon refuses to start while any are)."""
    try:
        applied = {v for (v,) in conn.execute("SELECT version FROM fraudd_schema_migrations").fetchall()}
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        applied = set()
    return [m.name for m in load_migrations() if m.version not in applied]
