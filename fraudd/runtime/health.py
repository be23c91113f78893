"""What the supervisor does besides supervising: group gauges, upkeep, and ``/metrics`` + ``/healthz``.

The housekeeper runs in the supervisor's loop every few seconds. It must never take the daemon
down: while Redis or PostgreSQL is away it records that (``fraudd_dependency_up``), logs it once,
and tries again next time.

``/healthz`` (here and in the ingest) answers what is not ready in generic words, the same for
everyone who asks; the error text, which names addresses and versions, goes to the log only. A
probe opens connections, so its answer is reused for ``HEALTH_CACHE_S``: a monitor polling hard,
or many, cost one probe a second.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import psycopg
import redis
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from redis.cluster import RedisCluster

from .. import shard_counts
from ..schema import ensure_partitions
from ..settings import ConsumerSettings, PostgresSettings, RedisSettings
from . import metrics
from .groups import GroupState, combined, group_state
from .probes import check_postgres, connect_postgres, memory_problem, redis_memory
from .redis_clients import REDIS_FAILURES, redis_client
from .retention import trim_acked

log = logging.getLogger(__name__)

PARTITION_UPKEEP_INTERVAL_S = 3600.0
PARTITION_DAYS_AHEAD = 7
GONE_CONSUMER_MIN_IDLE_MS = 60_000
HEALTH_CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class HealthProblem:
    """Something not ready: ``part: summary`` is what ``/healthz`` answers, ``detail`` what the log gets."""

    part: str
    summary: str
    detail: str = ""

    @property
    def line(self) -> str:
        return f"{self.part}: {self.summary}"


def health_body(problems: list[HealthProblem]) -> str:
    """``/healthz``'s text: ``ok``, or one generic line per problem."""
    return "".join(p.line + "\n" for p in problems) if problems else "ok\n"


def log_health_change(before: list[HealthProblem], after: list[HealthProblem]) -> None:
    """Log the details when what ``/healthz`` answers changes (not on every probe)."""
    if [p.line for p in before] == [p.line for p in after]:
        return
    if after:
        details = [f"{p.part}: {p.detail or p.summary}" for p in after]
        log.warning("not ready: " + "; ".join(details), extra={"event": "unhealthy", "problems": details})
    else:
        log.info("ready again", extra={"event": "healthy"})


class Housekeeper:
    """Periodic supervisor chores of a service whose workers consume ``streams`` as ``consumer``
    says; each chore tolerates its dependency being down. ``partitions``: also create the coming
    days' ``transactions`` partitions (the scoring, which writes them; other services only check
    that PostgreSQL answers)."""

    def __init__(
        self,
        redis_settings: RedisSettings,
        postgres: PostgresSettings,
        consumer: ConsumerSettings,
        streams: list[str],
        partitions: bool = False,
    ) -> None:
        self.postgres = postgres
        self.partitions = partitions
        self.consumer = consumer
        self.streams = streams
        self.redis = redis_client(
            redis_settings.url, redis_settings.cluster, decode_responses=True, socket_timeout=2, socket_connect_timeout=2
        )
        self._next_partitions = 0.0
        self._down: set[str] = set()
        self._state: GroupState | None = None
        self._state_at = 0.0
        self._rate: float | None = None
        self._stranded: list[shard_counts.Stranded] = []

    def run_once(self) -> None:
        self._guard("redis", self._group_gauges)
        self._guard("postgres", self._partitions)

    def keep_input(self, stream: str, shards: int, retention_s: int) -> None:
        """The upkeep of input stream ``stream`` read as ``shards`` shards (``streams``), ``fraudd
        run``'s alone (other consumers keep their own stream): the shard count recorded and checked,
        and the acknowledged entries trimmed."""
        self._guard("redis", lambda: self._shard_count(stream, shards))
        self._guard("redis", lambda: self._trim(retention_s))

    def summary(self) -> str:
        """One line for systemd's status: the group's read rate, lag and pending, as last gathered."""
        if "redis" in self._down:
            return "redis unavailable"
        if self._state is None:
            return "lag unknown yet"
        rate = "" if self._rate is None else f"{self._rate:,.0f} tx/s, "
        return f"{rate}lag {self._state.lag:,}, pending {self._state.pending:,}"

    def _guard(self, dependency: str, chore: Callable[[], None]) -> None:
        try:
            chore()
        except (*REDIS_FAILURES, psycopg.Error, OSError) as exc:
            metrics.dependency_up.labels(dependency).set(0)
            if dependency not in self._down:
                self._down.add(dependency)
                log.error(
                    f"{dependency} unavailable to the supervisor",
                    extra={"event": "outage", "component": dependency, "error": str(exc)},
                )
            return
        metrics.dependency_up.labels(dependency).set(1)
        if dependency in self._down:
            self._down.discard(dependency)
            log.info(f"{dependency} back", extra={"event": "recovered", "component": dependency})

    def _group_gauges(self) -> None:
        s = self.consumer
        memory = redis_memory(self.redis)
        metrics.redis_memory_used.set(memory.used)
        metrics.redis_memory_max.set(memory.maximum)
        states = {stream: group_state(self.redis, stream, s.group) for stream in self.streams}
        state = combined(list(states.values()))
        now = time.monotonic()
        previous = self._state
        if previous is not None and previous.entries_read is not None and state.entries_read is not None:
            # Entries the group took from the stream per second: scoring throughput once pending is flat.
            self._rate = max(0, state.entries_read - previous.entries_read) / (now - self._state_at)
        self._state, self._state_at = state, now
        metrics.group_lag.set(state.lag)
        metrics.group_pending.set(state.pending)
        metrics.oldest_pending_age.set(state.oldest_pending_age_s)
        # A consumer that owns nothing and has not read for long is gone (its worker died and its
        # name was not reused, e.g. after --workers was lowered): drop it to keep the group tidy.
        ours = {s.consumer_name(i) for i in range(s.workers)}
        for stream, shard_state in states.items():
            for consumer in shard_state.consumers:
                name = consumer["name"]
                if (
                    name not in ours
                    and consumer["pending"] == 0
                    and consumer["idle"] > max(GONE_CONSUMER_MIN_IDLE_MS, 2 * s.claim_idle_ms)
                ):
                    self.redis.xgroup_delconsumer(stream, s.group, name)
                    log.info("removed a gone consumer", extra={"event": "consumer_removed", "consumer": name})

    def _shard_count(self, stream: str, shards: int) -> None:
        """Record this --shards as alive, and say when entries wait where no worker of it reads."""
        shard_counts.record(self.redis, stream, shards, int(time.time() * 1000))
        stranded = shard_counts.stranded(self.redis, stream, shards, self.consumer.group)
        metrics.stranded_entries.set(sum(left.entries for left in stranded))
        if stranded and {left.stream for left in stranded} != {left.stream for left in self._stranded}:
            log.error(shard_counts.describe(stranded, shards), extra={"event": "stranded"})
        self._stranded = stranded

    def _trim(self, retention_s: int) -> None:
        """Trim each input stream of what every group acknowledged (``--retention-s``): whoever
        produces, the stream stays bounded. Each shard's calls go to the node serving it."""
        trimmed = sum(trim_acked(self.redis, stream, retention_s) for stream in self.streams)
        if trimmed:
            log.debug("trimmed acknowledged entries", extra={"event": "trimmed", "entries": trimmed})

    def _partitions(self) -> None:
        if not self.partitions or time.monotonic() < self._next_partitions:
            check_postgres(self.postgres)
            return
        with connect_postgres(self.postgres) as conn:
            created = ensure_partitions(conn, PARTITION_DAYS_AHEAD)
        if created:
            log.info("partitions created", extra={"event": "partitions_created", "count": created})
        self._next_partitions = time.monotonic() + PARTITION_UPKEEP_INTERVAL_S


def health_problems(postgres: PostgresSettings, client: redis.Redis | RedisCluster) -> list[HealthProblem]:
    """What is wrong with the dependencies right now; empty when Redis (writable, not evicting) and
    PostgreSQL answer."""
    problems = []
    try:
        memory = redis_memory(client)
    except REDIS_FAILURES as exc:
        problems.append(HealthProblem("redis", "unavailable", str(exc)))
    else:
        refusing = bool(metrics.current("fraudd_redis_out_of_memory"))
        problem = memory_problem(memory, refusing)
        if problem:
            summary = (
                "out of memory, writes refused (raise maxmemory)"
                if refusing
                else "may evict keys (set maxmemory-policy noeviction)"
            )
            problems.append(HealthProblem("redis", summary, problem))
    try:
        check_postgres(postgres)
    except (psycopg.Error, OSError) as exc:
        problems.append(HealthProblem("postgres", "unavailable", str(exc).strip()))
    return problems


class HealthServer:
    """``/metrics`` (all workers' metrics summed) and ``/healthz`` (``problems()``, at most once per
    ``HEALTH_CACHE_S``) on ``listen`` (host, port), in a thread. Neither asks who is asking, hence
    loopback by default."""

    def __init__(self, listen: tuple[str, int], problems: Callable[[], list[HealthProblem]]) -> None:
        self._metrics_app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]] = make_wsgi_app(
            metrics.multiprocess_registry()
        )
        self._problems = problems
        # Requests are served on a thread each: the lock makes those arriving together share one probe.
        self._probe_lock = threading.Lock()
        self._current: list[HealthProblem] = []
        self._expires = 0.0
        host, port = listen
        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        self._server = make_server(host, port, self._app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            problems = self._health()
            body = health_body(problems).encode()
            start_response(
                "200 OK" if not problems else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
            )
            return [body]
        return self._metrics_app(environ, start_response)

    def _health(self) -> list[HealthProblem]:
        with self._probe_lock:
            if time.monotonic() >= self._expires:
                problems = self._problems()
                log_health_change(self._current, problems)
                self._current, self._expires = problems, time.monotonic() + HEALTH_CACHE_S
            return self._current


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds are not news
        pass
