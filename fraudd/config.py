"""Every setting of the daemon: one CLI flag each, each also read from an environment variable.

The environment names of the origin deployment (``REDIS_URL``, ``POSTGRES_URL``,
``ML_MODEL_PATH``, ``CONSUMER_GROUP``, ``CONSUMER_ID``) work unchanged; the rest are
``FRAUDD_<FLAG>``. Values are checked before anything forks, so a bad one stops start-up with one
line naming the option instead of a crash loop of tracebacks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import click

from .keys import shard_streams


def packaged(package: str, name: str) -> Path:
    """A file shipped inside fraudd (model, rules, Lua, migrations), where the install put it.

    Found through package resources, so a checkout and an installed wheel resolve it the same way;
    a wheel unpacks to the file system, so it is a real path that onnxruntime can open and SIGHUP
    can re-read.
    """
    return Path(str(resources.files(package).joinpath(name)))


DEFAULT_MODEL = packaged("fraudd.scoring", "fraud.onnx")
DEFAULT_RULES = packaged("fraudd.scoring", "rules.toml")


class ConfigError(click.ClickException):
    """A setting is unusable; the message names the option and says why, in one line."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str
    postgres_url: str
    pg_schema: str
    model_path: Path
    rules_path: Path
    stream: str
    fraud_stream: str
    dlq_stream: str
    group: str
    consumer_id: str
    workers: int
    batch_size: int
    block_ms: int
    pipeline_depth: int
    review_threshold: float | None
    decline_threshold: float | None
    max_deliveries: int
    claim_idle_ms: int
    dedup_window_s: int
    shutdown_timeout_s: float
    metrics_port: int
    log_level: str
    thresholds: Path | None = None
    shards: int = 1
    lease_ms: int = 10_000
    labels_stream: str = "transactions:labels"
    shadow_model: Path | None = None
    redis_cluster: bool = False

    @property
    def input_streams(self) -> list[str]:
        """The input stream, or with ``--shards`` S > 1 its S shard streams (``keys.shard_stream``)."""
        return shard_streams(self.stream, self.shards)

    def consumer_name(self, index: int) -> str:
        """Worker ``index``'s consumer name; stable across respawns so it re-reads its own pending."""
        return f"{self.consumer_id}-{index}"


def _positive(name: str):
    def check(ctx, param, value):
        if value is not None and value <= 0:
            raise click.BadParameter(f"must be > 0, got {value}", param_hint=f"--{name}")
        return value

    return check


def _probability(ctx, param, value):
    if value is not None and not 0.0 < value < 1.0:
        raise click.BadParameter(f"must be between 0 and 1, got {value}")
    return value


# (flag, environment variable, click keyword arguments, help). The README's table is this list.
OPTIONS: list[tuple[str, str, dict, str]] = [
    ("redis-url", "REDIS_URL", {"default": "redis://127.0.0.1:6379/0"}, "Redis holding the streams and feature state."),
    (
        "redis-cluster",
        "REDIS_CLUSTER",
        {"is_flag": True, "default": False},
        "--redis-url names seed nodes of a Redis Cluster (comma-separated URLs); needs --shards > 1.",
    ),
    ("postgres-url", "POSTGRES_URL", {"default": "postgresql://127.0.0.1:5432/postgres"}, "PostgreSQL receiving the decisions."),
    ("pg-schema", "FRAUDD_PG_SCHEMA", {"default": "public"}, "PostgreSQL schema of fraudd's tables."),
    (
        "model-path",
        "ML_MODEL_PATH",
        {"default": str(DEFAULT_MODEL), "type": click.Path(dir_okay=False, path_type=Path)},
        "ONNX model file (with fraudd metadata).",
    ),
    (
        "rules-path",
        "FRAUDD_RULES_PATH",
        {"default": str(DEFAULT_RULES), "type": click.Path(dir_okay=False, path_type=Path)},
        "Rules file (TOML); re-read on SIGHUP.",
    ),
    ("stream", "FRAUDD_STREAM", {"default": "transactions:raw"}, "Input stream."),
    ("fraud-stream", "FRAUDD_FRAUD_STREAM", {"default": "transactions:fraud"}, "Stream receiving every non-approved decision."),
    (
        "labels-stream",
        "FRAUDD_LABELS_STREAM",
        {"default": "transactions:labels"},
        "Stream of labels (chargebacks, analyst verdicts) that `fraudd labels` stores.",
    ),
    ("dlq-stream", "FRAUDD_DLQ_STREAM", {"default": "transactions:dlq"}, "Dead-letter stream for invalid and poison entries."),
    ("group", "CONSUMER_GROUP", {"default": "fraud-group"}, "Consumer group (created at start, from the stream's beginning)."),
    ("consumer-id", "CONSUMER_ID", {"default": socket.gethostname()}, "Consumer name prefix; worker i is <consumer-id>-<i>."),
    (
        "workers",
        "FRAUDD_WORKERS",
        {"default": os.cpu_count() or 1, "type": int, "callback": _positive("workers")},
        "Worker processes.",
    ),
    (
        "batch-size",
        "FRAUDD_BATCH_SIZE",
        {"default": 1000, "type": int, "callback": _positive("batch-size")},
        "Entries per XREADGROUP (COUNT).",
    ),
    (
        "block-ms",
        "FRAUDD_BLOCK_MS",
        {"default": 50, "type": int, "callback": _positive("block-ms")},
        "XREADGROUP BLOCK when the stream is idle.",
    ),
    (
        "pipeline-depth",
        "FRAUDD_PIPELINE_DEPTH",
        {"default": 1, "type": click.IntRange(1, 2)},
        "Reads in flight per worker: 2 overlaps one read's COPY and settle with scoring the next.",
    ),
    (
        "shards",
        "FRAUDD_SHARDS",
        {"default": 1, "type": click.IntRange(1, 16384)},
        "Input shards: S > 1 reads the streams <stream>:{0} .. <stream>:{S-1}, one owner each.",
    ),
    (
        "lease-ms",
        "FRAUDD_LEASE_MS",
        {"default": 10_000, "type": click.IntRange(500)},
        "With --shards > 1: how long a shard's owner may go silent before another worker takes it over.",
    ),
    (
        "review-threshold",
        "FRAUDD_REVIEW_THRESHOLD",
        {"default": None, "type": float, "callback": _probability},
        "Score from which a transaction is reviewed; default: the model's.",
    ),
    (
        "decline-threshold",
        "FRAUDD_DECLINE_THRESHOLD",
        {"default": None, "type": float, "callback": _probability},
        "Score from which a transaction is declined; default: the model's.",
    ),
    (
        "thresholds",
        "FRAUDD_THRESHOLDS",
        {"default": None, "type": click.Path(dir_okay=False, path_type=Path)},
        "Thresholds file from `fraudd calibrate` (instead of the two above); re-read on SIGHUP.",
    ),
    (
        "shadow-model",
        "FRAUDD_SHADOW_MODEL",
        {"default": None, "type": click.Path(dir_okay=False, path_type=Path)},
        "Challenger ONNX model: scores every batch too, stored beside the champion, never decides; re-read on SIGHUP.",
    ),
    (
        "max-deliveries",
        "FRAUDD_MAX_DELIVERIES",
        {"default": 5, "type": int, "callback": _positive("max-deliveries")},
        "Deliveries after which an entry is dead-lettered as poison.",
    ),
    (
        "claim-idle-ms",
        "FRAUDD_CLAIM_IDLE_MS",
        {"default": 30000, "type": int, "callback": _positive("claim-idle-ms")},
        "Idle time after which another worker reclaims a pending entry.",
    ),
    (
        "dedup-window-s",
        "FRAUDD_DEDUP_WINDOW_S",
        {"default": 3600, "type": int, "callback": _positive("dedup-window-s")},
        "How long a transaction_id is remembered for duplicates.",
    ),
    (
        "shutdown-timeout-s",
        "FRAUDD_SHUTDOWN_TIMEOUT_S",
        {"default": 30.0, "type": float, "callback": _positive("shutdown-timeout-s")},
        "Grace period for workers to settle their batch on SIGTERM.",
    ),
    (
        "metrics-port",
        "FRAUDD_METRICS_PORT",
        {"default": 0, "type": click.IntRange(0, 65535)},
        "Port of /metrics and /healthz (0: off).",
    ),
    (
        "log-level",
        "FRAUDD_LOG_LEVEL",
        {"default": "INFO", "type": click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)},
        "Log level.",
    ),
]


# ``fraudd alerts`` takes these besides ``OPTIONS`` (its stream is --fraud-stream).
ALERT_OPTIONS: list[tuple[str, str, dict, str]] = [
    (
        "config",
        "FRAUDD_ALERTS_CONFIG",
        {"required": True, "type": click.Path(dir_okay=False, path_type=Path)},
        "Channels file (TOML), see alerts.example.toml; re-read on SIGHUP.",
    ),
    (
        "alerts-group",
        "FRAUDD_ALERTS_GROUP",
        {"default": "fraudd-alerts"},
        "Consumer group of the alert service on --fraud-stream.",
    ),
    (
        "max-attempts",
        "FRAUDD_MAX_ATTEMPTS",
        {"default": 10, "type": int, "callback": _positive("max-attempts")},
        "Delivery attempts per alert and channel before it goes to the DLQ.",
    ),
    (
        "fraud-retention-s",
        "FRAUDD_FRAUD_RETENTION_S",
        {"default": 86_400, "type": int, "callback": _positive("fraud-retention-s")},
        "How long fraud-stream entries every group has acknowledged stay on the stream before trimming.",
    ),
    (
        "deliveries-retention-days",
        "FRAUDD_DELIVERIES_RETENTION_DAYS",
        {"default": 90, "type": click.IntRange(min=0)},
        "Delivered and failed rows of alert_deliveries older than this are deleted (0: keep every row).",
    ),
]


@dataclass(frozen=True, slots=True)
class AlertSettings:
    config: Path
    alerts_group: str
    max_attempts: int
    fraud_retention_s: int
    deliveries_retention_days: int


def settings_options(function):
    """Decorate a click command with every option of ``OPTIONS``."""
    return _options(OPTIONS, function)


def alert_options(function):
    """Decorate a click command with every option of ``ALERT_OPTIONS``."""
    return _options(ALERT_OPTIONS, function)


def _options(options: list[tuple[str, str, dict, str]], function):
    for flag, envvar, kwargs, help_text in reversed(options):
        function = click.option(f"--{flag}", envvar=envvar, show_default=True, show_envvar=True, help=help_text, **kwargs)(
            function
        )
    return function


def selected_options(*flags: str):
    """Decorate a click command with the named ``OPTIONS`` only (commands that need a few settings)."""
    chosen = [option for option in OPTIONS if option[0] in flags]
    missing = set(flags) - {option[0] for option in chosen}
    if missing:
        raise ValueError(f"unknown options {sorted(missing)}")

    return lambda function: _options(chosen, function)


def settings_from(params: dict) -> Settings:
    """Build ``Settings`` from a click command's parameters (the keyword arguments it received)."""
    names = {f.name for f in fields(Settings)}
    values = {name: params[name] for name in names}
    values["log_level"] = values["log_level"].upper()
    _check_cluster(values)
    return Settings(**values)


def _check_cluster(values: dict) -> None:
    if values["redis_cluster"] and values["shards"] < 2:
        # One shard means one hash slot: a cluster would hold all of fraudd on one node.
        raise ConfigError("--redis-cluster needs --shards > 1 (one shard lives in one slot, on one node)")


def alert_settings_from(params: dict) -> AlertSettings:
    return AlertSettings(**{f.name: params[f.name] for f in fields(AlertSettings)})


# -- fraudd ingest ---------------------------------------------------------------------------

_SHARED_WITH_INGEST = (
    "redis-url",
    "redis-cluster",
    "postgres-url",
    "pg-schema",
    "stream",
    "fraud-stream",
    "dlq-stream",
    "group",
    "dedup-window-s",
    "shutdown-timeout-s",
    "log-level",
    "shards",
    "labels-stream",
)
DECISION_NAMES = ("approve", "review", "decline")


def _listen_address(ctx, param, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


INGEST_OPTIONS: list[tuple[str, str, dict, str]] = [
    (
        "listen",
        "FRAUDD_LISTEN",
        {"default": "127.0.0.1:8080", "callback": _listen_address},
        "Address the HTTP API listens on (HOST:PORT).",
    ),
    (
        "api-keys-file",
        "FRAUDD_API_KEYS_FILE",
        {"default": None, "type": click.Path(dir_okay=False, path_type=Path)},
        "API keys, one per line: KEY_ID:TOKEN:SIGNING_SECRET[:SCOPE+SCOPE...] or a bare token (# comments); re-read on SIGHUP.",
    ),
    (
        "api-keys",
        "FRAUDD_API_KEYS",
        {"default": None, "show_default": False},
        "API keys, comma-separated (prefer the environment or the file: flags show in ps).",
    ),
    (
        "insecure-no-auth",
        "FRAUDD_INSECURE_NO_AUTH",
        {"is_flag": True, "default": False},
        "Serve without API keys on a non-loopback address.",
    ),
    (
        "require-signature",
        "FRAUDD_REQUIRE_SIGNATURE",
        {"is_flag": True, "default": False},
        "Require an HMAC-SHA256 request signature (X-Fraudd-Timestamp, X-Fraudd-Signature) keyed with each key's signing secret.",
    ),
    (
        "signature-window-s",
        "FRAUDD_SIGNATURE_WINDOW_S",
        {"default": 300, "type": int, "callback": _positive("signature-window-s")},
        "How far a signed request's timestamp may be from the server's clock.",
    ),
    (
        "workers",
        "FRAUDD_INGEST_WORKERS",
        {"default": os.cpu_count() or 1, "type": int, "callback": _positive("workers")},
        "HTTP server processes sharing the listening socket.",
    ),
    (
        "max-batch",
        "FRAUDD_MAX_BATCH",
        {"default": 1000, "type": int, "callback": _positive("max-batch")},
        "Most transactions in one batch request.",
    ),
    (
        "max-lag",
        "FRAUDD_MAX_LAG",
        {"default": 1_000_000, "type": int, "callback": _positive("max-lag")},
        "Group lag from which writes are refused with 503 and Retry-After.",
    ),
    (
        "retention-s",
        "FRAUDD_RETENTION_S",
        {"default": 3600, "type": int, "callback": _positive("retention-s")},
        "How long entries every group has acknowledged stay on the stream before trimming.",
    ),
    (
        "decision-timeout-ms",
        "FRAUDD_DECISION_TIMEOUT_MS",
        {"default": 250, "type": int, "callback": _positive("decision-timeout-ms")},
        "How long /v1/score waits for the decision before answering the fallback.",
    ),
    (
        "fallback-decision",
        "FRAUDD_FALLBACK_DECISION",
        {"default": "review", "type": click.Choice(DECISION_NAMES)},
        "Decision /v1/score answers when none arrived in time.",
    ),
    (
        "client-timeout-s",
        "FRAUDD_CLIENT_TIMEOUT_S",
        {"default": 10.0, "type": float, "callback": _positive("client-timeout-s")},
        "Time a client has to send a whole request, and an idle keep-alive connection lives.",
    ),
    (
        "tls-cert",
        "FRAUDD_TLS_CERT",
        {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        "TLS certificate chain (PEM); serves HTTPS when given.",
    ),
    (
        "tls-key",
        "FRAUDD_TLS_KEY",
        {"default": None, "type": click.Path(exists=True, dir_okay=False, path_type=Path)},
        "TLS private key (PEM), with --tls-cert.",
    ),
] + [option for option in OPTIONS if option[0] in _SHARED_WITH_INGEST]


@dataclass(frozen=True, slots=True)
class IngestSettings:
    listen: tuple[str, int]
    api_keys_file: Path | None
    api_keys: str | None
    insecure_no_auth: bool
    require_signature: bool
    signature_window_s: int
    workers: int
    max_batch: int
    max_lag: int
    retention_s: int
    decision_timeout_ms: int
    fallback_decision: str
    client_timeout_s: float
    tls_cert: Path | None
    tls_key: Path | None
    redis_url: str
    postgres_url: str
    pg_schema: str
    stream: str
    fraud_stream: str
    dlq_stream: str
    group: str
    dedup_window_s: int
    shutdown_timeout_s: float
    log_level: str
    shards: int = 1
    labels_stream: str = "transactions:labels"
    redis_cluster: bool = False

    @property
    def input_streams(self) -> list[str]:
        """The input stream, or with ``--shards`` S > 1 its S shard streams."""
        return shard_streams(self.stream, self.shards)


def ingest_options(function):
    """Decorate a click command with every option of ``INGEST_OPTIONS``."""
    for flag, envvar, kwargs, help_text in reversed(INGEST_OPTIONS):
        kwargs = {"show_default": True, **kwargs}
        function = click.option(f"--{flag}", envvar=envvar, show_envvar=True, help=help_text, **kwargs)(function)
    return function


def ingest_settings_from(params: dict) -> IngestSettings:
    """``IngestSettings`` from a click command's parameters."""
    values = {f.name: params[f.name] for f in fields(IngestSettings)}
    values["log_level"] = values["log_level"].upper()
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    _check_cluster(values)
    return IngestSettings(**values)
