"""The settings of ``fraudd run``: the scoring workers, their model, rules and thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..keys import shard_streams
from ..settings import (
    CONSUMER_OPTIONS,
    DEDUP_WINDOW_S,
    DLQ_STREAM,
    FRAUD_STREAM,
    GROUP,
    LOG_LEVEL,
    METRICS_OPTIONS,
    POSTGRES_OPTIONS,
    REDIS_OPTIONS,
    SHARDS,
    STREAM,
    ConfigError,
    ConsumerSettings,
    MetricsSettings,
    Option,
    PostgresSettings,
    RedisSettings,
    check_cluster,
    packaged,
    positive,
    probability,
)

DEFAULT_MODEL = packaged("fraudd.scoring", "fraud.onnx")
DEFAULT_RULES = packaged("fraudd.scoring", "rules.toml")


@dataclass(frozen=True, slots=True)
class ScoringSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    consumer: ConsumerSettings  # its stream is --stream, sharded or not
    metrics: MetricsSettings
    fraud_stream: str
    dlq_stream: str
    log_level: str
    model_path: Path = DEFAULT_MODEL
    rules_path: Path = DEFAULT_RULES
    review_threshold: float | None = None
    decline_threshold: float | None = None
    thresholds: Path | None = None
    shadow_model: Path | None = None
    pipeline_depth: int = 1
    shards: int = 1
    lease_ms: int = 10_000
    dedup_window_s: int = 3600
    retention_s: int = 3600

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ScoringSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        settings = cls(
            RedisSettings.from_params(params),
            PostgresSettings.from_params(params),
            ConsumerSettings.from_params(params, params["stream"], params["group"]),
            MetricsSettings.from_params(params),
            params["fraud_stream"],
            params["dlq_stream"],
            params["log_level"],
            params["model_path"],
            params["rules_path"],
            params["review_threshold"],
            params["decline_threshold"],
            params["thresholds"],
            params["shadow_model"],
            params["pipeline_depth"],
            params["shards"],
            params["lease_ms"],
            params["dedup_window_s"],
            params["retention_s"],
        )
        check_cluster(settings.redis, settings.shards)
        if settings.thresholds is not None and (settings.review_threshold is not None or settings.decline_threshold is not None):
            raise ConfigError(
                "--thresholds / FRAUDD_THRESHOLDS: give either a thresholds file or --review-threshold/--decline-threshold"
            )
        return settings

    @property
    def input_streams(self) -> list[str]:
        """The input stream, or with ``--shards`` S > 1 its S shard streams (``keys.shard_stream``)."""
        return shard_streams(self.consumer.stream, self.shards)


def _path(default: Path | None) -> dict[str, Any]:
    return {"default": None if default is None else str(default), "type": click.Path(dir_okay=False, path_type=Path)}


MODEL_PATH = Option("model-path", "ML_MODEL_PATH", "ONNX model file (with fraudd metadata).", _path(DEFAULT_MODEL))
THRESHOLDS = Option(
    "thresholds",
    "FRAUDD_THRESHOLDS",
    "Thresholds file from `fraudd calibrate` (instead of the two above); re-read on SIGHUP.",
    _path(None),
)
RULES_PATH = Option("rules-path", "FRAUDD_RULES_PATH", "Rules file (TOML); re-read on SIGHUP.", _path(DEFAULT_RULES))

OPTIONS: list[Option] = [
    *REDIS_OPTIONS,
    *POSTGRES_OPTIONS,
    MODEL_PATH,
    RULES_PATH,
    STREAM,
    FRAUD_STREAM,
    DLQ_STREAM,
    GROUP,
    *CONSUMER_OPTIONS,
    Option(
        "pipeline-depth",
        "FRAUDD_PIPELINE_DEPTH",
        "Reads in flight per worker: 2 overlaps one read's COPY and settle with scoring the next.",
        {"default": 1, "type": click.IntRange(1, 2)},
    ),
    SHARDS,
    Option(
        "lease-ms",
        "FRAUDD_LEASE_MS",
        "With --shards > 1: how long a shard's owner may go silent before another worker takes it over.",
        {"default": 10_000, "type": click.IntRange(500)},
    ),
    Option(
        "review-threshold",
        "FRAUDD_REVIEW_THRESHOLD",
        "Score from which a transaction is reviewed; default: the model's.",
        {"default": None, "type": float, "callback": probability},
    ),
    Option(
        "decline-threshold",
        "FRAUDD_DECLINE_THRESHOLD",
        "Score from which a transaction is declined; default: the model's.",
        {"default": None, "type": float, "callback": probability},
    ),
    THRESHOLDS,
    Option(
        "shadow-model",
        "FRAUDD_SHADOW_MODEL",
        "Challenger ONNX model: scores every batch too, stored beside the champion, never decides; re-read on SIGHUP.",
        _path(None),
    ),
    DEDUP_WINDOW_S,
    Option(
        "retention-s",
        "FRAUDD_RETENTION_S",
        "How long entries every group has acknowledged stay on the input stream before the supervisor trims them.",
        {"default": 3600, "type": int, "callback": positive("retention-s")},
    ),
    *METRICS_OPTIONS,
    LOG_LEVEL,
]


def check_files(settings: ScoringSettings) -> None:
    """Model, challenger, rules and thresholds file load, and the thresholds belong to the model
    (workers re-read them on SIGHUP and keep the old ones when a new one is bad)."""
    from . import thresholds
    from .features import FEATURE_NAMES
    from .model import FraudModel, ModelError
    from .rules import Rules, RulesError

    try:
        model = FraudModel.load(settings.model_path, FEATURE_NAMES)
    except ModelError as exc:
        raise ConfigError(f"--model-path / ML_MODEL_PATH: {exc}") from None
    if settings.shadow_model is not None:
        try:
            FraudModel.load(settings.shadow_model, FEATURE_NAMES)
        except ModelError as exc:
            raise ConfigError(f"--shadow-model / FRAUDD_SHADOW_MODEL: {exc}") from None
    try:
        Rules.load(settings.rules_path)
    except RulesError as exc:
        raise ConfigError(f"--rules-path: {exc}") from None
    if settings.thresholds is not None:
        try:
            thresholds.load(settings.thresholds).check_model(model.version, settings.thresholds)
        except thresholds.ThresholdsError as exc:
            raise ConfigError(f"--thresholds / FRAUDD_THRESHOLDS: {exc}") from None
