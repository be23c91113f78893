"""The settings of ``fraudd ingest``: the HTTP API, its keys, limits and TLS, and the streams it writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click

from ..keys import shard_streams
from ..settings import (
    DEDUP_WINDOW_S,
    DLQ_STREAM,
    FRAUD_STREAM,
    GROUP,
    LABELS_STREAM,
    LOG_LEVEL,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    SHARDS,
    SHUTDOWN_TIMEOUT_S,
    STREAM,
    Option,
    PostgresSettings,
    RedisSettings,
    check_cluster,
    check_tls,
    listen_address,
    positive,
    tls_options,
)

DECISION_NAMES = ("approve", "review", "decline")


@dataclass(frozen=True, slots=True)
class IngestSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    listen: tuple[str, int]
    api_keys_file: Path | None
    api_keys: str | None
    insecure_no_auth: bool
    require_signature: bool
    signature_window_s: int
    workers: int
    max_batch: int
    max_lag: int
    max_connections: int
    decision_timeout_ms: int
    fallback_decision: str
    client_timeout_s: float
    tls_cert: Path | None
    tls_key: Path | None
    stream: str
    fraud_stream: str
    dlq_stream: str
    labels_stream: str
    group: str  # the scoring group, whose lag sets off back-pressure
    shards: int
    dedup_window_s: int
    shutdown_timeout_s: float
    log_level: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IngestSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        own = {f.name: params[f.name] for f in fields(cls) if f.name not in ("redis", "postgres")}
        settings = cls(RedisSettings.from_params(params), PostgresSettings.from_params(params), **own)
        check_tls(settings.tls_cert, settings.tls_key)
        check_cluster(settings.redis, settings.shards)
        return settings

    @property
    def input_streams(self) -> list[str]:
        """The input stream, or with ``--shards`` S > 1 its S shard streams."""
        return shard_streams(self.stream, self.shards)


OPTIONS: list[Option] = [
    Option(
        "listen",
        "FRAUDD_LISTEN",
        "Address the HTTP API listens on (HOST:PORT).",
        {"default": "127.0.0.1:8080", "callback": listen_address},
    ),
    Option(
        "api-keys-file",
        "FRAUDD_API_KEYS_FILE",
        "API keys, one per line: KEY_ID:TOKEN:SIGNING_SECRET[:SCOPE+SCOPE...] or a bare token (# comments); re-read on SIGHUP.",
        {"default": None, "type": click.Path(dir_okay=False, path_type=Path)},
    ),
    Option(
        "api-keys",
        "FRAUDD_API_KEYS",
        "API keys, comma-separated (prefer the environment or the file: flags show in ps).",
        {"default": None, "show_default": False},
    ),
    Option(
        "insecure-no-auth",
        "FRAUDD_INSECURE_NO_AUTH",
        "Serve without API keys on a non-loopback address.",
        {"is_flag": True, "default": False},
    ),
    Option(
        "require-signature",
        "FRAUDD_REQUIRE_SIGNATURE",
        "Require an HMAC-SHA256 request signature (X-Fraudd-Timestamp, X-Fraudd-Signature) keyed with each key's signing secret.",
        {"is_flag": True, "default": False},
    ),
    Option(
        "signature-window-s",
        "FRAUDD_SIGNATURE_WINDOW_S",
        "How far a signed request's timestamp may be from the server's clock.",
        {"default": 300, "type": int, "callback": positive("signature-window-s")},
    ),
    Option(
        "workers",
        "FRAUDD_INGEST_WORKERS",
        "HTTP server processes sharing the listening socket.",
        {"default": os.cpu_count() or 1, "type": int, "callback": positive("workers")},
    ),
    Option(
        "max-batch",
        "FRAUDD_MAX_BATCH",
        "Most transactions in one batch request.",
        {"default": 1000, "type": int, "callback": positive("max-batch")},
    ),
    Option(
        "max-lag",
        "FRAUDD_MAX_LAG",
        "Group lag from which writes are refused with 503 and Retry-After.",
        {"default": 1_000_000, "type": int, "callback": positive("max-lag")},
    ),
    Option(
        "max-connections",
        "FRAUDD_MAX_CONNECTIONS",
        "Open connections per HTTP server process; one more is closed as soon as it is accepted (keep below LimitNOFILE).",
        {"default": 1000, "type": int, "callback": positive("max-connections")},
    ),
    Option(
        "decision-timeout-ms",
        "FRAUDD_DECISION_TIMEOUT_MS",
        "How long /v1/score waits for the decision before answering the fallback.",
        {"default": 250, "type": int, "callback": positive("decision-timeout-ms")},
    ),
    Option(
        "fallback-decision",
        "FRAUDD_FALLBACK_DECISION",
        "Decision /v1/score answers when none arrived in time.",
        {"default": "review", "type": click.Choice(DECISION_NAMES)},
    ),
    Option(
        "client-timeout-s",
        "FRAUDD_CLIENT_TIMEOUT_S",
        "Time a client has to send a whole request, and an idle keep-alive connection lives.",
        {"default": 10.0, "type": float, "callback": positive("client-timeout-s")},
    ),
    *tls_options("FRAUDD"),
    *REDIS_OPTIONS,
    *POSTGRES_OPTIONS,
    STREAM,
    FRAUD_STREAM,
    LABELS_STREAM,
    DLQ_STREAM,
    GROUP,
    SHARDS,
    DEDUP_WINDOW_S,
    SHUTDOWN_TIMEOUT_S,
    LOG_LEVEL,
]
