"""Versioned SQL migrations (the package ``fraudd.migrations``) and the upkeep of time partitions.

Each file ``NNN_name.sql`` is applied once, in its own transaction, and recorded with its checksum
in ``fraudd_schema_migrations``; a concurrent ``fraudd migrate`` waits on an advisory lock instead
of racing. Running it again is a no-op.

Where the server has loaded TimescaleDB, ``transactions`` then becomes a hypertable with the
compression and retention policies asked for; elsewhere it keeps native daily partitions. The
server is asked which before anything changes, because a TimescaleDB that is installed but not
loaded kills the session that creates the extension, midway through the migrations.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "fraudd.migrations"
_MIGRATION_FILE = re.compile(r"^[0-9]{3}_\w+\.sql$")
_MIGRATION_LOCK = 0x6672617564  # "fraud": one number all fraudd migrators agree on


class MigrationError(RuntimeError):
    """No migration is installed, one was edited after it was applied, or one failed to apply.

    Its message is one line for the operator: ``fraudd migrate`` prints it instead of a traceback.
    """


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(package: str = MIGRATIONS_PACKAGE) -> list[Migration]:
    """The migrations shipped in ``package``, by version.

    None at all means a broken installation (a wheel built without its data files); applying
    nothing would leave a schema the daemon cannot use, so that is an error.
    """
    folder = resources.files(package)
    migrations = [
        Migration(int(entry.name[:3]), entry.name.removesuffix(".sql"), entry.read_text())
        for entry in folder.iterdir()
        if _MIGRATION_FILE.match(entry.name)
    ]
    if not migrations:
        raise MigrationError(f"no migrations found in {folder}: this fraudd installation is incomplete, reinstall it")
    return sorted(migrations, key=lambda m: m.version)


def connect(url: str, pg_schema: str, **kwargs) -> psycopg.Connection:
    """A connection whose unqualified names (``transactions``, …) resolve in ``pg_schema``.

    The search path is a connection option, so every fraudd connection gets it the same way and
    without a round trip of its own.
    """
    return psycopg.connect(url, options=f"-c search_path={pg_schema}", **kwargs)


async def connect_async(url: str, pg_schema: str, **kwargs) -> psycopg.AsyncConnection:
    """``connect`` for asyncio code (the HTTP ingest)."""
    return await psycopg.AsyncConnection.connect(url, options=f"-c search_path={pg_schema}", **kwargs)


def one_row(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The row of a query that always answers one (an aggregate, a function call)."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.ProgrammingError("the query answered no row")
    return row


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: list[str]
    storage: str  # what ``transactions`` is now, in one line for the operator


NATIVE = "native daily partitions"
NOT_LOADED = (
    f"{NATIVE}; TimescaleDB is installed but not loaded: to use it, set shared_preload_libraries = "
    "'timescaledb' in postgresql.conf, restart PostgreSQL and run `fraudd migrate` again while the table is empty"
)


def timescaledb_state(conn: psycopg.Connection) -> tuple[bool, bool]:
    """(installed, loaded): the extension's files are on the server / its library is preloaded.

    Only a loaded TimescaleDB can be used; read-only, so it is safe to ask before migrating. Asked
    without reading ``shared_preload_libraries``, which only superusers (and pg_read_all_settings)
    may: the preloaded library defines its settings, an integer among them, where a mere mention
    in postgresql.conf would leave an untyped placeholder.
    """
    installed, loaded = one_row(
        conn.execute(
            "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb'), "
            "EXISTS (SELECT FROM pg_settings WHERE name = 'timescaledb.bgw_launcher_poll_time' AND vartype = 'integer')"
        )
    )
    return bool(installed), bool(loaded)


def migrate(
    conn: psycopg.Connection, pg_schema: str, partition_days_ahead: int = 7, compress_after_days: int = 7, retention_days: int = 0
) -> MigrationReport:
    """Apply pending migrations, choose the storage, create the coming days' partitions.

    ``conn`` comes from ``connect(url, pg_schema)``: the schema is created here if missing.
    ``compress_after_days`` / ``retention_days`` are TimescaleDB's policies (0: none); a retention
    the server cannot honour is refused before anything changes, as is an install without migrations.
    """
    migrations = load_migrations()
    conn.autocommit = True
    installed, loaded = timescaledb_state(conn)
    if retention_days and not loaded:
        raise MigrationError(
            f"a retention of {retention_days} days needs TimescaleDB, which this server has not loaded "
            "(shared_preload_libraries = 'timescaledb'); nothing was changed"
        )
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
        applied: dict[int, str] = dict(conn.execute("SELECT version, checksum FROM fraudd_schema_migrations").fetchall())
        done = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(f"migration {migration.name} changed after it was applied; add a new migration instead")
                continue
            with _one_line_errors(f"migration {migration.name} failed and was rolled back"), conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO fraudd_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            log.info("migration applied", extra={"event": "migration_applied", "migration": migration.name})
            done.append(migration.name)
        storage = NOT_LOADED if installed else NATIVE
        if loaded:
            with _one_line_errors("TimescaleDB storage failed and was rolled back"), conn.transaction():
                storage = one_row(
                    conn.execute("SELECT fraudd_use_timescaledb(%s, %s)", (_days(compress_after_days), _days(retention_days)))
                )[0]
        ensure_partitions(conn, partition_days_ahead)
        return MigrationReport(done, storage)
    finally:
        if not conn.closed:  # a lost connection has released the lock already
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def _days(days: int) -> timedelta | None:
    return timedelta(days=days) if days else None


@contextmanager
def _one_line_errors(what: str) -> Iterator[None]:
    """A database error as a ``MigrationError`` of one line, for the operator instead of a traceback."""
    try:
        yield
    except psycopg.Error as exc:
        raise MigrationError(f"{what}: {' '.join(str(exc).split())}") from exc


def ensure_partitions(conn: psycopg.Connection, days_ahead: int) -> int:
    """Create daily partitions from yesterday to ``days_ahead`` days out; returns how many were new."""
    today = datetime.now(UTC).date()
    first, last = today - timedelta(days=1), today + timedelta(days=days_ahead)
    row = one_row(conn.execute("SELECT fraudd_ensure_partitions(%s, %s)", (first, last)))
    return int(row[0])


def pending_migrations(conn: psycopg.Connection) -> list[str]:
    """Names of migrations not yet applied (the daemon refuses to start while any are)."""
    try:
        applied = {v for (v,) in conn.execute("SELECT version FROM fraudd_schema_migrations").fetchall()}
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        applied = set()
    return [m.name for m in load_migrations() if m.version not in applied]
