"""The settings of ``fraudd rules``: PostgreSQL, where the rule sets live, and Redis, where the
published pointer and the blocklists live, one copy per shard of ``--stream``."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any

import click

from ..settings import POSTGRES_OPTIONS, REDIS_OPTIONS, SHARDS, STREAM, Option, PostgresSettings, RedisSettings


@dataclass(frozen=True, slots=True)
class RulesSettings:
    redis: RedisSettings
    postgres: PostgresSettings
    stream: str  # the input stream, whose shards hold the pointer and the blocklists
    shards: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RulesSettings:
        """The settings of a click command decorated with ``OPTIONS``, from the keyword arguments it received."""
        # No check of --shards against --redis-cluster: the pointer goes to the shards of every count
        # the stream was scored with (``pointer.shard_keys``), ``--shards`` only adds one.
        return cls(RedisSettings.from_params(params), PostgresSettings.from_params(params), params["stream"], params["shards"])


OPTIONS: list[Option] = [*REDIS_OPTIONS, *POSTGRES_OPTIONS, STREAM, SHARDS]

ACTOR = Option(
    "actor",
    "FRAUDD_ACTOR",
    "Who does this, as the audit records it.",
    {"default": getpass.getuser(), "show_default": "the OS user"},
)
MINUTES_PER_CASE = Option(
    "minutes-per-case",
    "FRAUDD_MINUTES_PER_CASE",
    "Analyst minutes one review case takes, for the hours extra cases mean.",
    {"default": 5.0, "type": click.FloatRange(0, min_open=True)},
)
