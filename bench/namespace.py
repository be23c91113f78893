"""A run's private streams, consumer group and PostgreSQL schema, and their removal."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

import fraudd.namespace
from fraudd.keys import shard_stream

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
FRAUDD = [sys.executable, "-m", "fraudd"]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Namespace(fraudd.namespace.Namespace):
    """Names no other run (or test) uses; ``shards`` > 1: the input is fraudd's shard streams."""

    shards: int = 1

    @property
    def streams(self) -> list[str]:
        return [shard_stream(self.stream, self.shards, k) for k in range(self.shards)]

    @classmethod
    def fresh(cls, label: str, redis_url: str, postgres_url: str) -> Namespace:
        return cls(f"bench_{label}_{uuid.uuid4().hex[:8]}", redis_url, postgres_url)

    def env(self) -> dict[str, str]:
        """The environment that points ``fraudd`` (and the baselines) at this namespace."""
        env = dict(os.environ)
        # bench is not an installed package: its helper processes find it from the repository root.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env.update(self.environment())
        return env

    def migrate(self) -> None:
        """Create the schema with fraudd's own migrations, as an operator would."""
        result = subprocess.run([*FRAUDD, "migrate"], env=self.env(), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"fraudd migrate failed for {self.schema}:\n{result.stderr[-2000:]}")

    def create_group(self, client: redis.Redis) -> None:
        """The group fraudd would create at start, made up front so prefilled entries are all new to it."""
        for stream in self.streams:
            client.xgroup_create(stream, self.group, id="0", mkstream=True)
