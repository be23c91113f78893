"""A self-contained fraudd installation on shared servers: its own streams, group and schema.

The demo, the benchmark and the tests each run fraudd next to other work on one Redis and one
PostgreSQL. Every name is derived from one word, and every Redis key fraudd writes carries the
input stream's hash tag, so a unique stream name keeps state, markers and rows apart, and
``drop`` removes all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from .schema import connect


@dataclass
class Namespace:
    name: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    postgres_url: str = "postgresql://127.0.0.1:5432/postgres"

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
    def labels_stream(self) -> str:
        return f"{self.name}:transactions:labels"

    @property
    def group(self) -> str:
        return "fraud-group"

    @property
    def schema(self) -> str:
        return self.name

    @property
    def consumer_id(self) -> str:
        return f"{self.name}-c"

    def environment(self) -> dict[str, str]:
        """The variables that point a ``fraudd`` command at this namespace."""
        return {
            "REDIS_URL": self.redis_url,
            "POSTGRES_URL": self.postgres_url,
            "FRAUDD_PG_SCHEMA": self.schema,
            "FRAUDD_STREAM": self.stream,
            "FRAUDD_FRAUD_STREAM": self.fraud_stream,
            "FRAUDD_DLQ_STREAM": self.dlq_stream,
            "FRAUDD_LABELS_STREAM": self.labels_stream,
            "CONSUMER_GROUP": self.group,
            "CONSUMER_ID": self.consumer_id,
        }

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with connect(self.postgres_url, self.schema, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def drop(self, client: redis.Redis) -> None:
        """Remove every key and the schema; safe on a half-created namespace."""
        keys = [self.stream, self.fraud_stream, self.dlq_stream, self.labels_stream]
        # Keys tagged with any of the streams (markers of alerts and dead letters live with the fraud
        # and DLQ streams), then the shards' keys, then the streams themselves.
        for pattern in (f"fraudd:{{{self.name}:*", f"fraudd:{self.stream}:*", f"{self.name}:*"):
            keys += list(client.scan_iter(match=pattern, count=10_000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
