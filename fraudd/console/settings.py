"""``fraudd console``'s settings: its own flags, plus the shared Redis/PostgreSQL/stream ones it needs.

Redis and the input stream's name and shard count are here because a verdict teaches the scoring
(confirmed-fraud counts) and a block edits the rules' live blocklists, both kept per input shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

import click

from ..config import OPTIONS, ConfigError, _listen_address, _positive
from ..keys import shard_streams

_SHARED = (
    "redis-url",
    "redis-cluster",
    "postgres-url",
    "pg-schema",
    "rules-path",
    "stream",
    "shards",
    "shutdown-timeout-s",
    "metrics-port",
    "log-level",
)

CONSOLE_OPTIONS: list[tuple[str, str, dict, str]] = [
    (
        "listen",
        "FRAUDD_CONSOLE_LISTEN",
        {"default": "127.0.0.1:8090", "callback": _listen_address},
        "Address the console listens on (HOST:PORT); loopback unless you mean it.",
    ),
    (
        "workers",
        "FRAUDD_CONSOLE_WORKERS",
        {"default": min(os.cpu_count() or 1, 2), "type": int, "callback": _positive("workers")},
        "HTTP server processes sharing the listening socket.",
    ),
    (
        "sla-minutes",
        "FRAUDD_CONSOLE_SLA_MINUTES",
        {"default": 240, "type": int, "callback": _positive("sla-minutes")},
        "Time within which a case should get its verdict; older open cases are breached and come first.",
    ),
    (
        "lease-minutes",
        "FRAUDD_CONSOLE_LEASE_MINUTES",
        {"default": 30, "type": int, "callback": _positive("lease-minutes")},
        "A claimed case returns to the queue after this long without its analyst working on it.",
    ),
    (
        "session-idle-minutes",
        "FRAUDD_CONSOLE_SESSION_IDLE_MINUTES",
        {"default": 30, "type": int, "callback": _positive("session-idle-minutes")},
        "A session unused this long is signed out.",
    ),
    (
        "login-attempts",
        "FRAUDD_CONSOLE_LOGIN_ATTEMPTS",
        {"default": 5, "type": int, "callback": _positive("login-attempts")},
        "Failed sign-ins of one username within 15 minutes after which it is refused until they age out.",
    ),
    (
        "tls-cert",
        "FRAUDD_CONSOLE_TLS_CERT",
        {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        "TLS certificate chain (PEM); serves HTTPS (and Secure cookies) when given.",
    ),
    (
        "tls-key",
        "FRAUDD_CONSOLE_TLS_KEY",
        {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        "TLS private key (PEM), with --tls-cert.",
    ),
] + [option for option in OPTIONS if option[0] in _SHARED]


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    listen: tuple[str, int]
    workers: int
    sla_minutes: int
    lease_minutes: int
    session_idle_minutes: int
    login_attempts: int
    tls_cert: Path | None
    tls_key: Path | None
    redis_url: str
    redis_cluster: bool
    postgres_url: str
    pg_schema: str
    rules_path: Path
    stream: str
    shards: int
    shutdown_timeout_s: float
    metrics_port: int
    log_level: str

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


def console_options(function):
    """Decorate a click command with every option of ``CONSOLE_OPTIONS``."""
    for flag, envvar, kwargs, help_text in reversed(CONSOLE_OPTIONS):
        function = click.option(f"--{flag}", envvar=envvar, show_default=True, show_envvar=True, help=help_text, **kwargs)(
            function
        )
    return function


def console_settings_from(params: dict) -> ConsoleSettings:
    values = {f.name: params[f.name] for f in fields(ConsoleSettings)}
    values["log_level"] = values["log_level"].upper()
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return ConsoleSettings(**values)
