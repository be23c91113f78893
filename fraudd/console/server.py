"""Running the console: the supervisor's view (``service``), its housekeeping, and one aiohttp
server per process on the shared socket."""

from __future__ import annotations

import logging
import socket
import ssl
from datetime import timedelta

import psycopg
from aiohttp import web

from ..runtime.listener import bind, serve, serve_in_process, tls_context
from ..runtime.process import WorkerProcess
from ..runtime.redis_clients import connect_redis
from ..runtime.supervisor import Service
from ..schema import connect
from ..scoring.rules import Rules
from ..settings import PostgresSettings
from . import audit, cases, links, metrics, queue, sessions
from .app import make_app
from .context import Console, templates
from .db import Database
from .settings import ConsoleSettings
from .verdicts import Teacher

log = logging.getLogger(__name__)


def service(settings: ConsoleSettings) -> Service:
    """``fraudd console``: binds the socket and loads the rules' reasons before the fork, so a bad
    address, certificate or rules file stops start-up with one line; re-ranks the open cases for
    the current SLA once."""
    sock = bind(settings.listen)
    context = tls_context(settings.tls_cert, settings.tls_key)
    rule_reasons = {rule.code: rule.reason for rule in Rules.load(settings.rules_path).rules}
    with connect(settings.postgres.url, settings.postgres.schema, autocommit=True) as conn:
        cases.rerank(conn, settings.sla)
    housekeeper = Housekeeper(settings.postgres, settings.sla, settings.session_idle)
    metrics.sla_seconds.set(settings.sla.total_seconds())
    return Service(
        name="fraudd console",
        workers=settings.workers,
        run_worker=lambda process: serve_in_process(process, lambda: _serve(settings, sock, context, rule_reasons, process)),
        worker_name=lambda index: f"console-{index}",
        shutdown_timeout_s=settings.shutdown_timeout_s,
        log_level=settings.log_level,
        metrics_listen=settings.metrics.listen,
        housekeeping=housekeeper.run_once,
        summary=housekeeper.summary,
    )


class Housekeeper:
    """Every few seconds, in the supervisor: new decisions become cases, new transactions extend the
    linked customers, leases that ran out return
    their cases to the queue (audited), idle sessions go, the queues are counted for the pages and
    the gauges. Logs an
    outage once, never raises."""

    def __init__(self, postgres: PostgresSettings, sla: timedelta, session_idle: timedelta) -> None:
        self._postgres = postgres
        self._sla = sla
        self._session_idle = session_idle
        self._conn: psycopg.Connection | None = None
        self._failing = False
        self._open = 0

    def run_once(self) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._postgres.url, self._postgres.schema, connect_timeout=3, autocommit=True)
            conn = self._conn
            with conn.transaction():
                created = cases.sync(conn, self._sla)
            with conn.transaction():
                links.sync(conn)
            with conn.transaction():
                for transaction_id, assignee in queue.expire_leases(conn):
                    audit.record(
                        conn, "fraudd", "lease_expired", transaction_id, before={"assignee": assignee}, after={"assignee": None}
                    )
            sessions.expire(conn, self._session_idle)
            tallies = queue.store_tallies(conn, self._sla)
            oldest = queue.oldest_open_age(conn)
        except psycopg.Error as exc:
            if not self._failing:
                log.error("cannot keep the queue", extra={"event": "outage", "component": "postgres", "error": str(exc)})
            self._failing = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return
        self._failing = False
        if created:
            metrics.cases_created.inc(created)
            log.info("cases created", extra={"event": "cases_created", "cases": created})
        metrics.set_depth(tallies, oldest)
        self._open = sum(counted["open"] for counted in tallies.values())

    def summary(self) -> str:
        return f"{self._open} open cases"


async def _serve(
    settings: ConsoleSettings,
    sock: socket.socket,
    context: ssl.SSLContext | None,
    rule_reasons: dict[str, str],
    process: WorkerProcess,
) -> None:
    """Serve until told to stop (or orphaned); requests in progress get ``--shutdown-timeout-s``.
    A reload has nothing to re-read: it is answered at once."""
    console = Console(
        settings=settings,
        db=Database(settings.postgres.url, settings.postgres.schema),
        teacher=Teacher(connect_redis(settings.redis.url, settings.redis.cluster), settings.stream, settings.shards),
        templates=templates(),
        rule_reasons=rule_reasons,
    )
    runner = web.AppRunner(make_app(console), access_log=None, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s)
    await serve(process, runner, sock, context, settings.listen, settings.shutdown_timeout_s)
