"""One look at a dependency: Redis's memory as INFO reports it, whether PostgreSQL answers.

The supervisor's housekeeping and ``/healthz`` (``health.py``), the command line's checks before a
service starts (``preflight.py``) and ``fraudd status`` ask these. Unlike ``health.py`` this imports
neither the metrics nor prometheus-client (nor numpy with them): a one-shot command that only
looks reads them without the services' start-up cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from redis.cluster import RedisCluster

from ..schema import connect
from ..settings import PostgresSettings

# Share of maxmemory from which `fraudd status` calls Redis full (a batch's write needs some room).
NEARLY_FULL = 0.95


@dataclass(frozen=True, slots=True)
class RedisMemory:
    """Redis's memory as ``INFO memory`` reports it (INFO works where CONFIG is disabled, as on managed Redis)."""

    used: int
    maximum: int  # 0: no limit
    policy: str

    def eviction_problem(self) -> str | None:
        """Why this Redis may drop fraudd's keys, naming the setting to use; None when it never evicts."""
        if self.policy == "noeviction":
            return None
        return (
            f"Redis maxmemory-policy is {self.policy}: it may evict fraudd's streams, dedup markers or "
            f"behaviour state and break exactly-once without a sign; set maxmemory-policy noeviction"
        )

    def describe(self) -> str:
        limit = f"of maxmemory {_mib(self.maximum)}" if self.maximum else "(no maxmemory)"
        return f"used {_mib(self.used)} {limit}, policy {self.policy}"


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def redis_memory(client: redis.Redis | RedisCluster) -> RedisMemory:
    """The memory of the Redis, or of a cluster's fullest primary with the first evicting policy any
    primary has: one primary full or evicting is enough to stop or break the shards it serves."""
    if not isinstance(client, RedisCluster):
        return _memory(client.info("memory"))
    primaries = list(primary_memory(client).values())
    fullest = max(primaries, key=lambda m: (m.used / m.maximum if m.maximum else 0.0, m.used))
    evicting = next((m.policy for m in primaries if m.eviction_problem()), fullest.policy)
    return RedisMemory(fullest.used, fullest.maximum, evicting)


def primary_memory(client: RedisCluster) -> dict[str, RedisMemory]:
    """Each primary's memory, by node name (``host:port``). Asked node by node: for a single target
    node redis-py answers that node's INFO itself, not a mapping by node."""
    return {node.name: _memory(client.get_redis_connection(node).info("memory")) for node in client.get_primaries()}


def _memory(info: dict[str, Any]) -> RedisMemory:
    return RedisMemory(int(info["used_memory"]), int(info["maxmemory"]), str(info["maxmemory_policy"]))


def memory_problem(memory: RedisMemory, refusing: bool) -> str | None:
    """The ``/healthz`` line of a Redis that refuses writes (``refusing``: a worker met
    OutOfMemoryError and waits) or may evict; None when neither.

    Redis refuses a write when the memory it holds plus the write's arguments exceed maxmemory, so
    a full Redis may show some room in INFO: only the workers know for sure."""
    if refusing:
        return (
            f"redis: out of memory ({memory.describe()}): writes are refused, scoring waits; "
            f"raise maxmemory or shorten --dedup-window-s"
        )
    problem = memory.eviction_problem()
    return f"redis: {problem}" if problem else None


def connect_postgres(postgres: PostgresSettings, timeout_s: int = 3) -> psycopg.Connection:
    return connect(
        postgres.url,
        postgres.schema,
        connect_timeout=timeout_s,
        autocommit=True,
        application_name="fraudd-supervisor",
    )


def check_postgres(postgres: PostgresSettings) -> None:
    with connect_postgres(postgres, timeout_s=2) as conn:
        conn.execute("SELECT 1")
