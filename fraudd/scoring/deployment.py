"""Which models a deployment runs: the ``models``, ``model_deployment`` and ``model_promotions`` tables.

``fraudd retrain`` and ``fraudd models promote|rollback`` change the deployment in one transaction
with its audit row, bumping ``generation``; every scoring worker of every supervisor polls that one
row at most once a second (``DeploymentWatch``) and swaps its models between two reads, so a
promotion is live everywhere within about a second and no read is scored by two champions. While
the table holds no deployment, the workers run ``--model-path``, ``--thresholds`` and
``--shadow-model`` as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg

from ..schema import connect, one_row

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
ACTIONS = ("retrain-promoted", "retrain-kept", "promote", "rollback")


class DeploymentError(RuntimeError):
    """A change of the deployment that cannot be made; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A model registered for the deployment, with the thresholds it decides with here."""

    version: str
    path: Path
    review_threshold: float
    decline_threshold: float
    calibration: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Deployed:
    generation: int
    champion: Registered
    shadow: Registered | None


_COLUMNS = "version, path, review_threshold, decline_threshold, calibration"


def _registered(row: tuple[Any, ...]) -> Registered:
    return Registered(row[0], Path(row[1]), float(row[2]), float(row[3]), row[4] or {})


def current(conn: psycopg.Connection) -> Deployed | None:
    """The deployment as stored, or None before the first retrain or promotion."""
    row = conn.execute(
        f"""SELECT d.generation, {", ".join(f"c.{c}" for c in _COLUMNS.split(", "))},
                   {", ".join(f"s.{c}" for c in _COLUMNS.split(", "))}
            FROM model_deployment d JOIN models c ON c.version = d.champion LEFT JOIN models s ON s.version = d.shadow"""
    ).fetchone()
    if row is None:
        return None
    return Deployed(int(row[0]), _registered(row[1:6]), None if row[6] is None else _registered(row[6:11]))


def registered(conn: psycopg.Connection, version: str) -> Registered | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM models WHERE version = %s", (version,)).fetchone()
    return None if row is None else _registered(row)


def register(conn: psycopg.Connection, model: Registered) -> None:
    """Record (or update) a model's file and thresholds."""
    conn.execute(
        f"""INSERT INTO models ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT (version) DO UPDATE SET path = excluded.path, review_threshold = excluded.review_threshold,
                decline_threshold = excluded.decline_threshold, calibration = excluded.calibration""",
        (
            model.version,
            str(model.path.resolve()),
            model.review_threshold,
            model.decline_threshold,
            orjson.dumps(model.calibration).decode(),
        ),
    )


def deploy(
    conn: psycopg.Connection,
    champion: str,
    shadow: str | None,
    action: str,
    actor: str,
    reason: str,
    comparison: dict[str, Any] | None = None,
    audited_version: str | None = None,
    replacing: str | None = None,
) -> int:
    """Make ``champion`` (and ``shadow``) what the workers run and audit it, in one transaction;
    returns the new generation. ``audited_version`` is the model the audit row is about (default:
    the champion; a kept candidate's row names the candidate); ``replacing`` the champion before the
    first deployment (the workers' --model-path), which the table does not know."""
    with conn.transaction():
        # Serializes concurrent changes: each audit row's previous_version is the champion it replaced.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('fraudd model_deployment'))")
        before = conn.execute("SELECT champion FROM model_deployment").fetchone()
        (generation,) = one_row(
            conn.execute(
                """INSERT INTO model_deployment (champion, shadow, generation) VALUES (%s, %s, 1)
               ON CONFLICT (singleton) DO UPDATE SET champion = excluded.champion, shadow = excluded.shadow,
                   generation = model_deployment.generation + 1, updated_at = now()
               RETURNING generation""",
                (champion, shadow),
            )
        )
        conn.execute(
            """INSERT INTO model_promotions (action, model_version, previous_version, actor, reason, comparison)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (
                action,
                audited_version or champion,
                replacing if before is None else before[0],
                actor,
                reason,
                None if comparison is None else orjson.dumps(comparison).decode(),
            ),
        )
    return int(generation)


def was_champion(conn: psycopg.Connection, version: str) -> bool:
    """Whether ``version`` ever decided in this deployment (what a rollback may restore)."""
    row = conn.execute(
        """SELECT 1 FROM model_promotions WHERE previous_version = %s
               OR (model_version = %s AND action IN ('retrain-promoted', 'promote', 'rollback'))
           LIMIT 1""",
        (version, version),
    ).fetchone()
    return row is not None


class DeploymentWatch:
    """A worker's view of the deployment: ``poll()`` returns the new one when its generation moved.

    One small query at most once per ``POLL_INTERVAL_S`` on a connection of its own (the worker's
    COPY connection may be busy in the settling thread). PostgreSQL being away is no reason to stop
    scoring: the running models are kept and the poll tries again next time. A deployment the worker
    could not load (``refused``) is offered again at the next poll, so it is taken as soon as its
    files are there.
    """

    def __init__(self, postgres_url: str, pg_schema: str) -> None:
        self._url, self._schema = postgres_url, pg_schema
        self._conn: psycopg.Connection | None = None
        self._generation = 0
        self._refused = 0
        self._next_poll = 0.0

    def poll(self) -> Deployed | None:
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_INTERVAL_S
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(
                    self._url, self._schema, connect_timeout=2, autocommit=True, application_name="fraudd-deployment"
                )
            (generation,) = one_row(self._conn.execute("SELECT coalesce(max(generation), 0) FROM model_deployment"))
            if generation == self._generation:
                return None
            deployed = current(self._conn)
        except psycopg.Error as exc:
            log.warning("cannot read the model deployment", extra={"event": "deployment_unreadable", "error": str(exc)})
            self.close()
            return None
        if deployed is not None:
            self._generation = deployed.generation
        return deployed

    def refused(self, deployed: Deployed) -> bool:
        """Forget ``deployed`` so the next poll offers it again; True the first time it is refused."""
        first = self._refused != deployed.generation
        self._generation, self._refused = 0, deployed.generation
        return first

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
