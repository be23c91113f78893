"""A run's private streams, consumer group and PostgreSQL schema, and their removal."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
FRAUDD = [sys.executable, "-m", "fraudd"]
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Namespace:
    """Names no other run (or test) uses; the schema doubles as the stream prefix.

    fraudd derives every Redis key it writes from the input stream's name (its hash tag), so a
    unique stream name is enough to keep this run's feature state and markers apart.
    """

    name: str
    redis_url: str
    postgres_url: str

    @classmethod
    def fresh(cls, label: str, redis_url: str, postgres_url: str) -> Namespace:
        return cls(f"bench_{label}_{uuid.uuid4().hex[:8]}", redis_url, postgres_url)

    @property
    def stream(self) -> str:
        return f"{self.name}:transactions:raw"

    @property
    def fraud_stream(self) -> str:
        return f"{self.name}:transactions:fraud"

    @property
    def dlq_stream(self) -> str:
        return f"{self.name}:transactions:dlq"

    @property
    def group(self) -> str:
        return "fraud-group"

    @property
    def schema(self) -> str:
        return self.name

    @property
    def consumer_id(self) -> str:
        return f"{self.name}-c"

    def env(self) -> dict[str, str]:
        """The environment that points ``fraudd`` (and the baselines) at this namespace."""
        env = dict(os.environ)
        # bench is not an installed package: its helper processes find it from the repository root.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env.update(
            REDIS_URL=self.redis_url,
            POSTGRES_URL=self.postgres_url,
            FRAUDD_PG_SCHEMA=self.schema,
            FRAUDD_STREAM=self.stream,
            FRAUDD_FRAUD_STREAM=self.fraud_stream,
            FRAUDD_DLQ_STREAM=self.dlq_stream,
            CONSUMER_GROUP=self.group,
            CONSUMER_ID=self.consumer_id,
        )
        return env

    def migrate(self) -> None:
        """Create the schema with fraudd's own migrations, as an operator would."""
        result = subprocess.run([*FRAUDD, "migrate"], env=self.env(), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"fraudd migrate failed for {self.schema}:\n{result.stderr[-2000:]}")

    def create_group(self, client: redis.Redis) -> None:
        """The group fraudd would create at start, made up front so prefilled entries are all new to it."""
        client.xgroup_create(self.stream, self.group, id="0", mkstream=True)

    def drop(self, client: redis.Redis) -> None:
        """Remove every key and the schema; safe to call on a half-created namespace."""
        keys = [self.stream, self.fraud_stream, self.dlq_stream]
        for pattern in (f"fraudd:{{{self.stream}}}:*", f"{self.name}:*"):
            keys += list(client.scan_iter(match=pattern, count=10_000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn.execute(query, params).fetchall()
