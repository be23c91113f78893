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
from pathlib import Path

import click

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "fraud.onnx"
DEFAULT_RULES = Path(__file__).resolve().parent / "scoring" / "rules.toml"


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
    ("postgres-url", "POSTGRES_URL", {"default": "postgresql://127.0.0.1:5432/postgres"}, "PostgreSQL receiving the decisions."),
    ("pg-schema", "FRAUDD_PG_SCHEMA", {"default": "public"}, "PostgreSQL schema of fraudd's tables."),
    ("model-path", "ML_MODEL_PATH", {"default": str(DEFAULT_MODEL), "type": click.Path(dir_okay=False, path_type=Path)}, "ONNX model file (with fraudd metadata)."),
    ("rules-path", "FRAUDD_RULES_PATH", {"default": str(DEFAULT_RULES), "type": click.Path(dir_okay=False, path_type=Path)}, "Rules file (TOML); re-read on SIGHUP."),
    ("stream", "FRAUDD_STREAM", {"default": "transactions:raw"}, "Input stream."),
    ("fraud-stream", "FRAUDD_FRAUD_STREAM", {"default": "transactions:fraud"}, "Stream receiving every non-approved decision."),
    ("dlq-stream", "FRAUDD_DLQ_STREAM", {"default": "transactions:dlq"}, "Dead-letter stream for invalid and poison entries."),
    ("group", "CONSUMER_GROUP", {"default": "fraud-group"}, "Consumer group (created at start, from the stream's beginning)."),
    ("consumer-id", "CONSUMER_ID", {"default": socket.gethostname()}, "Consumer name prefix; worker i is <consumer-id>-<i>."),
    ("workers", "FRAUDD_WORKERS", {"default": os.cpu_count() or 1, "type": int, "callback": _positive("workers")}, "Worker processes."),
    ("batch-size", "FRAUDD_BATCH_SIZE", {"default": 1000, "type": int, "callback": _positive("batch-size")}, "Entries per XREADGROUP (COUNT)."),
    ("block-ms", "FRAUDD_BLOCK_MS", {"default": 50, "type": int, "callback": _positive("block-ms")}, "XREADGROUP BLOCK when the stream is idle."),
    ("pipeline-depth", "FRAUDD_PIPELINE_DEPTH", {"default": 1, "type": click.IntRange(1, 2)}, "Reads in flight per worker: 2 overlaps one read's COPY and settle with scoring the next."),
    ("review-threshold", "FRAUDD_REVIEW_THRESHOLD", {"default": None, "type": float, "callback": _probability}, "Score from which a transaction is reviewed; default: the model's."),
    ("decline-threshold", "FRAUDD_DECLINE_THRESHOLD", {"default": None, "type": float, "callback": _probability}, "Score from which a transaction is declined; default: the model's."),
    ("max-deliveries", "FRAUDD_MAX_DELIVERIES", {"default": 5, "type": int, "callback": _positive("max-deliveries")}, "Deliveries after which an entry is dead-lettered as poison."),
    ("claim-idle-ms", "FRAUDD_CLAIM_IDLE_MS", {"default": 30000, "type": int, "callback": _positive("claim-idle-ms")}, "Idle time after which another worker reclaims a pending entry."),
    ("dedup-window-s", "FRAUDD_DEDUP_WINDOW_S", {"default": 3600, "type": int, "callback": _positive("dedup-window-s")}, "How long a transaction_id is remembered for duplicates."),
    ("shutdown-timeout-s", "FRAUDD_SHUTDOWN_TIMEOUT_S", {"default": 30.0, "type": float, "callback": _positive("shutdown-timeout-s")}, "Grace period for workers to settle their batch on SIGTERM."),
    ("metrics-port", "FRAUDD_METRICS_PORT", {"default": 0, "type": click.IntRange(0, 65535)}, "Port of /metrics and /healthz (0: off)."),
    ("log-level", "FRAUDD_LOG_LEVEL", {"default": "INFO", "type": click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)}, "Log level."),
]


def settings_options(function):
    """Decorate a click command with every option of ``OPTIONS``."""
    for flag, envvar, kwargs, help_text in reversed(OPTIONS):
        function = click.option(f"--{flag}", envvar=envvar, show_default=True, show_envvar=True, help=help_text, **kwargs)(function)
    return function


def settings_from(params: dict) -> Settings:
    """Build ``Settings`` from a click command's parameters (the keyword arguments it received)."""
    names = {f.name for f in fields(Settings)}
    values = {name: params[name] for name in names}
    values["log_level"] = values["log_level"].upper()
    return Settings(**values)
