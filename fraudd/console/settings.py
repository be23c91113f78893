"""The settings of ``fraudd console``: its own flags, composed with the shared Redis, PostgreSQL and
metrics groups.

Redis and the input stream's name and shard count are here because a verdict teaches the scoring
(confirmed-fraud counts) and a block edits the rules' live blocklists, both kept per input shard;
the rules file because a case shows each rule's reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..keys import shard_streams
from ..scoring.settings import RULES_PATH
from ..settings import (
    LOG_LEVEL,
    METRICS_OPTIONS,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    SHARDS,
    SHUTDOWN_TIMEOUT_S,
    STREAM,
    MetricsSettings,
    Option,
    PostgresSettings,
    RedisSettings,
    check_cluster,
    check_tls,
    listen_address,
    positive,
    tls_options,
)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    metrics: MetricsSettings
    listen: tuple[str, int]
    workers: int
    sla_minutes: int
    lease_minutes: int
    session_idle_minutes: int
    login_attempts: int
    tls_cert: Path | None
    tls_key: Path | None
    rules_path: Path
    stream: str
    shards: int
    shutdown_timeout_s: float
    log_level: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ConsoleSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        own = {name: params[name] for name in cls.__dataclass_fields__ if name not in ("redis", "postgres", "metrics")}
        settings = cls(
            RedisSettings.from_params(params), PostgresSettings.from_params(params), MetricsSettings.from_params(params), **own
        )
        check_tls(settings.tls_cert, settings.tls_key)
        check_cluster(settings.redis, settings.shards)
        return settings

    @property
    def input_streams(self) -> list[str]:
        return shard_streams(self.stream, self.shards)

    @property
    def sla(self) -> timedelta:
        return timedelta(minutes=self.sla_minutes)

    @property
    def lease(self) -> timedelta:
        return timedelta(minutes=self.lease_minutes)

    @property
    def session_idle(self) -> timedelta:
        return timedelta(minutes=self.session_idle_minutes)


OPTIONS: list[Option] = [
    Option(
        "listen",
        "FRAUDD_CONSOLE_LISTEN",
        "Address the console listens on (HOST:PORT); loopback unless you mean it.",
        {"default": "127.0.0.1:8090", "callback": listen_address},
    ),
    Option(
        "workers",
        "FRAUDD_CONSOLE_WORKERS",
        "HTTP server processes sharing the listening socket.",
        {"default": min(os.cpu_count() or 1, 2), "type": int, "callback": positive("workers")},
    ),
    Option(
        "sla-minutes",
        "FRAUDD_CONSOLE_SLA_MINUTES",
        "Time within which a case should get its verdict; older open cases are breached and come first.",
        {"default": 240, "type": int, "callback": positive("sla-minutes")},
    ),
    Option(
        "lease-minutes",
        "FRAUDD_CONSOLE_LEASE_MINUTES",
        "A claimed case returns to the queue after this long without its analyst working on it.",
        {"default": 30, "type": int, "callback": positive("lease-minutes")},
    ),
    Option(
        "session-idle-minutes",
        "FRAUDD_CONSOLE_SESSION_IDLE_MINUTES",
        "A session unused this long is signed out.",
        {"default": 30, "type": int, "callback": positive("session-idle-minutes")},
    ),
    Option(
        "login-attempts",
        "FRAUDD_CONSOLE_LOGIN_ATTEMPTS",
        "Failed sign-ins of one username within 15 minutes after which it is refused until they age out.",
        {"default": 5, "type": int, "callback": positive("login-attempts")},
    ),
    *tls_options("FRAUDD_CONSOLE", "HTTPS (and Secure cookies)"),
    *REDIS_OPTIONS,
    *POSTGRES_OPTIONS,
    RULES_PATH,
    STREAM,
    SHARDS,
    *METRICS_OPTIONS,
    SHUTDOWN_TIMEOUT_S,
    LOG_LEVEL,
]
