"""The settings of ``fraudd labels``: its consumer of the labels stream, and the input shards whose
confirmed-fraud counts it updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..settings import (
    CONSUMER_OPTIONS,
    DLQ_STREAM,
    GROUP,
    LABELS_STREAM,
    LOG_LEVEL,
    METRICS_OPTIONS,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    SHARDS,
    STREAM,
    ConsumerSettings,
    MetricsSettings,
    Option,
    PostgresSettings,
    RedisSettings,
    check_cluster,
)


@dataclass(frozen=True, slots=True)
class LabelSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    consumer: ConsumerSettings  # its stream is the labels stream
    metrics: MetricsSettings
    dlq_stream: str
    log_level: str
    stream: str  # the input stream, whose shards hold the confirmed-fraud counts
    shards: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> LabelSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        settings = cls(
            RedisSettings.from_params(params),
            PostgresSettings.from_params(params),
            ConsumerSettings.from_params(params, params["labels_stream"], params["group"]),
            MetricsSettings.from_params(params),
            params["dlq_stream"],
            params["log_level"],
            params["stream"],
            params["shards"],
        )
        check_cluster(settings.redis, settings.shards)
        return settings


OPTIONS: list[Option] = [
    *REDIS_OPTIONS,
    *POSTGRES_OPTIONS,
    LABELS_STREAM,
    DLQ_STREAM,
    GROUP,
    *CONSUMER_OPTIONS,
    STREAM,
    SHARDS,
    *METRICS_OPTIONS,
    LOG_LEVEL,
]
