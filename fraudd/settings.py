"""The settings groups every service composes its own settings of, and how an option is declared.

Each option is one CLI flag that is also read from an environment variable. The environment names
of the origin deployment (``REDIS_URL``, ``POSTGRES_URL``, ``ML_MODEL_PATH``, ``CONSUMER_GROUP``,
``CONSUMER_ID``) work unchanged; the rest are ``FRAUDD_<FLAG>``. A service's settings type (in its
own package: ``fraudd/scoring/settings.py``, ``fraudd/ingest/settings.py``, ...) lists the groups
and options it reads and nothing else, so ``fraudd SERVICE --help`` shows only what that service
uses. Values are checked before anything forks: a bad one stops start-up with one line naming the
option instead of a crash loop of tracebacks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
import redis


def packaged(package: str, name: str) -> Path:
    """A file shipped inside fraudd (model, rules, Lua, migrations), where the install put it.

    Found through package resources, so a checkout and an installed wheel resolve it the same way;
    a wheel unpacks to the file system, so it is a real path that onnxruntime can open and SIGHUP
    can re-read.
    """
    return Path(str(resources.files(package).joinpath(name)))


Decorated = TypeVar("Decorated", bound=Callable[..., Any])


class ConfigError(click.ClickException):
    """A setting is unusable; the message names the option and says why, in one line."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Option:
    """One flag ``--<flag>``, also read from ``envvar``; ``kwargs`` go to ``click.option``."""

    flag: str
    envvar: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def default(self) -> Any:
        return self.kwargs.get("default")

    def decorate(self, function: Decorated) -> Decorated:
        kwargs = {"show_default": True, **self.kwargs}
        return click.option(f"--{self.flag}", envvar=self.envvar, show_envvar=True, help=self.help, **kwargs)(function)


def options(*groups: list[Option]) -> Callable[[Decorated], Decorated]:
    """Decorate a click command with the options of ``groups``, in order (each flag once)."""
    chosen: dict[str, Option] = {}
    for group in groups:
        for option in group:
            chosen.setdefault(option.flag, option)

    def decorate(function: Decorated) -> Decorated:
        for option in reversed(chosen.values()):
            function = option.decorate(function)
        return function

    return decorate


# -- checks of single values (click callbacks) -----------------------------------------------


def positive(flag: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and value <= 0:
            raise click.BadParameter(f"must be > 0, got {value}", param_hint=f"--{flag}")
        return value

    return check


def probability(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 < value < 1.0:
        raise click.BadParameter(f"must be between 0 and 1, got {value}")
    return value


def listen_address(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` as (host, port); an empty host is every interface, ``[::1]:80`` an IPv6 one."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- options several services read, each declared once -----------------------------------------

STREAM = Option("stream", "FRAUDD_STREAM", "Input stream.", {"default": "transactions:raw"})
FRAUD_STREAM = Option(
    "fraud-stream", "FRAUDD_FRAUD_STREAM", "Stream receiving every non-approved decision.", {"default": "transactions:fraud"}
)
DLQ_STREAM = Option(
    "dlq-stream", "FRAUDD_DLQ_STREAM", "Dead-letter stream for invalid and poison entries.", {"default": "transactions:dlq"}
)
LABELS_STREAM = Option(
    "labels-stream",
    "FRAUDD_LABELS_STREAM",
    "Stream of labels (chargebacks, analyst verdicts) that `fraudd labels` stores.",
    {"default": "transactions:labels"},
)
SHARDS = Option(
    "shards",
    "FRAUDD_SHARDS",
    "Input shards: S > 1 reads the streams <stream>:{0} .. <stream>:{S-1}, one owner each.",
    {"default": 1, "type": click.IntRange(1, 16384)},
)
GROUP = Option(
    "group", "CONSUMER_GROUP", "Consumer group (created at start, from the stream's beginning).", {"default": "fraud-group"}
)
DEDUP_WINDOW_S = Option(
    "dedup-window-s",
    "FRAUDD_DEDUP_WINDOW_S",
    "How long a transaction_id is remembered for duplicates.",
    {"default": 3600, "type": int, "callback": positive("dedup-window-s")},
)
SHUTDOWN_TIMEOUT_S = Option(
    "shutdown-timeout-s",
    "FRAUDD_SHUTDOWN_TIMEOUT_S",
    "Grace period for workers to settle their batch on SIGTERM.",
    {"default": 30.0, "type": float, "callback": positive("shutdown-timeout-s")},
)
LOG_LEVEL = Option(
    "log-level",
    "FRAUDD_LOG_LEVEL",
    "Log level.",
    # Case-insensitive, and click gives back the upper-case choice.
    {"default": "INFO", "type": click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)},
)
WORKERS = Option(
    "workers",
    "FRAUDD_WORKERS",
    "Worker processes.",
    {"default": os.cpu_count() or 1, "type": int, "callback": positive("workers")},
)


# -- Redis -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    cluster: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RedisSettings:
        return cls(params["redis_url"], params["redis_cluster"])


def option_hint(param: click.Parameter) -> str:
    """``--flag / ENV`` of an option, as the one-line start-up errors name it."""
    envvar = f" / {param.envvar}" if isinstance(param.envvar, str) else ""
    return f"{param.opts[0]}{envvar}"


def check_redis_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A Redis URL (or a cluster's comma-separated seed URLs) that redis-py can use; the message
    never repeats the URL, which may hold a password."""
    for seed in value.split(","):
        try:
            redis.connection.parse_url(seed.strip())
        except ValueError as exc:
            raise ConfigError(f"{option_hint(param)}: {exc}") from None
    return value


def check_postgres_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A libpq connection string: ``postgresql://`` URL or ``key=value`` pairs (never repeated: passwords)."""
    try:
        psycopg.conninfo.conninfo_to_dict(value)
    except psycopg.ProgrammingError:
        raise ConfigError(f"{option_hint(param)}: neither a postgresql:// URL nor key=value pairs") from None
    return value


REDIS_URL = Option(
    "redis-url",
    "REDIS_URL",
    "Redis holding the streams and feature state.",
    {"default": "redis://127.0.0.1:6379/0", "callback": check_redis_url},
)
REDIS_CLUSTER = Option(
    "redis-cluster",
    "REDIS_CLUSTER",
    "--redis-url names seed nodes of a Redis Cluster (comma-separated redis:// or rediss:// URLs); the input then "
    "needs --shards > 1.",
    {"is_flag": True, "default": False},
)
REDIS_OPTIONS = [REDIS_URL, REDIS_CLUSTER]


def check_cluster(redis: RedisSettings, shards: int) -> None:
    if not redis.cluster:
        return
    if shards < 2:
        # One shard means one hash slot: a cluster would hold all of fraudd on one node.
        raise ConfigError("--redis-cluster needs --shards > 1 (one shard lives in one slot, on one node)")
    if any(seed.strip().startswith("unix:") for seed in redis.url.split(",")):
        # Cluster nodes name each other by host and port: a socket seed would leave the client
        # nothing to connect to but its default, 127.0.0.1:6379.
        raise ConfigError("--redis-cluster needs redis:// or rediss:// seed URLs: a cluster is not reached through a Unix socket")


# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    url: str
    schema: str = "public"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PostgresSettings:
        return cls(params["postgres_url"], params["pg_schema"])


POSTGRES_URL = Option(
    "postgres-url",
    "POSTGRES_URL",
    "PostgreSQL receiving the decisions.",
    {"default": "postgresql://127.0.0.1:5432/postgres", "callback": check_postgres_url},
)
PG_SCHEMA = Option("pg-schema", "FRAUDD_PG_SCHEMA", "PostgreSQL schema of fraudd's tables.", {"default": "public"})
POSTGRES_OPTIONS = [POSTGRES_URL, PG_SCHEMA]

# -- TLS of the HTTP services (ingest, console) ----------------------------------------------


def tls_options(envvar_prefix: str, serves: str = "HTTPS") -> list[Option]:
    """``--tls-cert`` and ``--tls-key`` of an HTTP service, read from ``<envvar_prefix>_TLS_CERT``
    and ``<envvar_prefix>_TLS_KEY``; ``serves``: what the certificate turns on, for the help."""
    return [
        Option(
            "tls-cert",
            f"{envvar_prefix}_TLS_CERT",
            f"TLS certificate chain (PEM); serves {serves} when given.",
            {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        ),
        Option(
            "tls-key",
            f"{envvar_prefix}_TLS_KEY",
            "TLS private key (PEM), with --tls-cert.",
            {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        ),
    ]


def check_tls(cert: Path | None, key: Path | None) -> None:
    """A certificate without its key (or the reverse) would only fail at the first handshake."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")


# -- /metrics and /healthz -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    listen: tuple[str, int] | None = None  # None: nothing served, metrics stay in process memory

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> MetricsSettings:
        listen, port = params["metrics_listen"], params["metrics_port"]
        if listen is not None and port:
            raise ConfigError("--metrics-listen and --metrics-port: give one of them (--metrics-port N is 127.0.0.1:N)")
        if listen is None and port:
            listen = ("127.0.0.1", port)
        return cls(listen)


METRICS_OPTIONS = [
    Option(
        "metrics-listen",
        "FRAUDD_METRICS_LISTEN",
        "Address of /metrics and /healthz (HOST:PORT; :PORT or 0.0.0.0:PORT for every interface) [default: off].",
        {"default": None, "callback": listen_address},
    ),
    Option(
        "metrics-port",
        "FRAUDD_METRICS_PORT",
        "Serve /metrics and /healthz on 127.0.0.1 at this port (0: off).",
        {"default": 0, "type": click.IntRange(0, 65535)},
    ),
]


# -- a stream consumer's worker processes ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """What the runtime's stream consumer (``runtime.consumer.StreamConsumer``) reads, and how
    many worker processes consume under which names. A service sets ``stream`` and ``group``: its
    own input and its own group flag."""

    stream: str
    group: str
    consumer_id: str
    workers: int
    batch_size: int = 1000
    block_ms: int = 50
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    shutdown_timeout_s: float = 30.0

    @classmethod
    def from_params(cls, params: dict[str, Any], stream: str, group: str, consumer_id: str | None = None) -> ConsumerSettings:
        return cls(
            stream,
            group,
            consumer_id or params["consumer_id"],
            params["workers"],
            params["batch_size"],
            params["block_ms"],
            params["claim_idle_ms"],
            params["max_deliveries"],
            params["shutdown_timeout_s"],
        )

    def consumer_name(self, index: int) -> str:
        """Worker ``index``'s consumer name; stable across respawns so it re-reads its own pending."""
        return f"{self.consumer_id}-{index}"


CONSUMER_OPTIONS = [
    Option(
        "consumer-id", "CONSUMER_ID", "Consumer name prefix; worker i is <consumer-id>-<i>.", {"default": socket.gethostname()}
    ),
    WORKERS,
    Option(
        "batch-size",
        "FRAUDD_BATCH_SIZE",
        "Entries per XREADGROUP (COUNT).",
        {"default": 1000, "type": int, "callback": positive("batch-size")},
    ),
    Option(
        "block-ms",
        "FRAUDD_BLOCK_MS",
        "XREADGROUP BLOCK when the stream is idle.",
        {"default": 50, "type": int, "callback": positive("block-ms")},
    ),
    Option(
        "max-deliveries",
        "FRAUDD_MAX_DELIVERIES",
        "Deliveries after which an entry is dead-lettered as poison.",
        {"default": 5, "type": int, "callback": positive("max-deliveries")},
    ),
    Option(
        "claim-idle-ms",
        "FRAUDD_CLAIM_IDLE_MS",
        "Idle time after which another worker reclaims a pending entry.",
        {"default": 30000, "type": int, "callback": positive("claim-idle-ms")},
    ),
    SHUTDOWN_TIMEOUT_S,
]
