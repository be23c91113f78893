"""The settings of ``fraudd alerts``: its consumer of the fraud stream, the channels file and the
delivery log's upkeep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..settings import (
    CONSUMER_OPTIONS,
    DLQ_STREAM,
    FRAUD_STREAM,
    LOG_LEVEL,
    METRICS_OPTIONS,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    ConsumerSettings,
    MetricsSettings,
    Option,
    PostgresSettings,
    RedisSettings,
    positive,
)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    # Its stream is the fraud stream (never sharded: --shards splits the input), its group
    # --alerts-group, its consumers <consumer-id>-alerts-<i>.
    consumer: ConsumerSettings
    metrics: MetricsSettings
    dlq_stream: str
    log_level: str
    config: Path
    from_beginning: bool = False  # a new --alerts-group starts at the fraud stream's beginning, not the present
    max_attempts: int = 10
    fraud_retention_s: int = 86_400
    deliveries_retention_days: int = 90

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AlertSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        return cls(
            RedisSettings.from_params(params),
            PostgresSettings.from_params(params),
            ConsumerSettings.from_params(
                params, params["fraud_stream"], params["alerts_group"], consumer_id=f"{params['consumer_id']}-alerts"
            ),
            MetricsSettings.from_params(params),
            params["dlq_stream"],
            params["log_level"],
            params["config"],
            params["from_beginning"],
            params["max_attempts"],
            params["fraud_retention_s"],
            params["deliveries_retention_days"],
        )

    @property
    def fraud_stream(self) -> str:
        return self.consumer.stream


OPTIONS: list[Option] = [
    Option(
        "config",
        "FRAUDD_ALERTS_CONFIG",
        "Channels file (TOML), see alerts.example.toml; re-read on SIGHUP.",
        {"required": True, "type": click.Path(dir_okay=False, path_type=Path)},
    ),
    *REDIS_OPTIONS,
    *POSTGRES_OPTIONS,
    FRAUD_STREAM,
    DLQ_STREAM,
    Option(
        "alerts-group",
        "FRAUDD_ALERTS_GROUP",
        "Consumer group of the alert service on --fraud-stream.",
        {"default": "fraudd-alerts"},
    ),
    Option(
        "from-beginning",
        "FRAUDD_ALERTS_FROM_BEGINNING",
        "A new --alerts-group starts at the fraud stream's beginning (the history is delivered), not at "
        "the present. An existing group always resumes where it was.",
        {"is_flag": True, "default": False},
    ),
    *CONSUMER_OPTIONS,
    Option(
        "max-attempts",
        "FRAUDD_MAX_ATTEMPTS",
        "Delivery attempts per alert and channel before it goes to the DLQ.",
        {"default": 10, "type": int, "callback": positive("max-attempts")},
    ),
    Option(
        "fraud-retention-s",
        "FRAUDD_FRAUD_RETENTION_S",
        "How long fraud-stream entries every group has acknowledged stay on the stream before trimming.",
        {"default": 86_400, "type": int, "callback": positive("fraud-retention-s")},
    ),
    Option(
        "deliveries-retention-days",
        "FRAUDD_DELIVERIES_RETENTION_DAYS",
        "Delivered and failed rows of alert_deliveries older than this are deleted (0: keep every row).",
        {"default": 90, "type": click.IntRange(min=0)},
    ),
    *METRICS_OPTIONS,
    LOG_LEVEL,
]
