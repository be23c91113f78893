"""The cost of a transaction over a long run, window by window: whether it grows with time or data.

A soak that keeps up for minutes and then falls behind has either met more load (the machine,
other people's work) or a cost per transaction that grows: with the rows stored, the users and
markers held in Redis, or something the worker accumulates. Rates cannot tell the two apart on a
shared box; CPU per transaction of each process can, since it does not depend on how much of the
machine the process got. So each sample takes every process's CPU (a ``Probe`` snapshot), the
transactions scored and offered so far, and what PostgreSQL and Redis hold and write: WAL bytes,
full-page images and checkpoints (pg_stat_wal, ``pg_writes``), index blocks read from outside
shared_buffers, the size of the namespace's tables and of each index summed over its partitions,
and Redis's memory and keys. ``windows`` turns consecutive samples into per-window figures.
The CPU of PostgreSQL's backends serving the workers (``application_name`` fraudd-worker) is
also taken apart from the server's background processes (checkpointer, WAL writer, bgwriter).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from bench import procstat
from bench.pg_writes import WriteCounters
from bench.usage import Probe, Snapshot, usage

MIB = 2**20
# commandstats of these are reported per window: the features call, its read, the settle, the read.
REDIS_COMMANDS = ("fcall", "hmget", "evalsha", "xreadgroup")
PROCESSES = ("workers", "supervisor", "redis", "postgres", "producer")

_POSTGRES_COUNTERS = """
SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, w.wal_fpi, w.wal_records,
       (SELECT coalesce(sum(idx_blks_read), 0)::bigint FROM pg_statio_all_indexes WHERE schemaname = %(schema)s),
       (SELECT coalesce(sum(idx_blks_hit), 0)::bigint FROM pg_statio_all_indexes WHERE schemaname = %(schema)s),
       (SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE application_name = 'fraudd-worker')
  FROM pg_stat_wal w
"""
# Each index of the namespace by its partitioned parent's name (a partition's own index rolls up),
# and the heap of every partition.
_SIZES = """
SELECT coalesce(parent.relname, c.relname), c.relkind::text, sum(pg_relation_size(c.oid))::bigint
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relkind = 'i'
  LEFT JOIN pg_class parent ON parent.oid = i.inhparent
 WHERE n.nspname = %(schema)s AND c.relkind IN ('i', 'r')
 GROUP BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the producer's clock started
    scored: int  # entries acked by the group so far
    offered: int  # entries added to the input so far
    lag: int
    cpu: Snapshot
    backend_cpu_s: dict[int, float]  # the workers' PostgreSQL backends, by pid
    postgres: dict[str, int]
    index_bytes: dict[str, int]
    table_bytes: int
    redis_memory: int
    redis_keys: int


class Sampler:
    """Takes ``Sample``s of one run: its processes through ``probe``, its schema's figures through
    a connection of its own."""

    def __init__(self, probe: Probe, client: redis.Redis, postgres_url: str, schema: str) -> None:
        self._probe = probe
        self._client = client
        self._conn = psycopg.connect(postgres_url, autocommit=True)
        self._writes = WriteCounters(self._conn)
        self._schema = schema

    def take(self, t: float, scored: int, offered: int, lag: int) -> Sample:
        cpu = self._probe.snapshot()
        args = {"schema": self._schema}
        row = self._conn.execute(_POSTGRES_COUNTERS, args).fetchone()
        assert row is not None
        *counters, backends = row
        postgres = dict(zip(("wal_bytes", "wal_fpi", "wal_records", "idx_blks_read", "idx_blks_hit"), (int(v) for v in counters)))
        postgres.update(self._writes.read())
        backend_cpu = {}
        for pid in backends:
            proc = procstat.read(pid)
            if proc is not None:
                backend_cpu[pid] = proc.cpu_s
        indexes, table = {}, 0
        for name, kind, size in self._conn.execute(_SIZES, args).fetchall():
            if kind == "i":
                indexes[name] = int(size)
            else:
                table += int(size)
        memory = int(self._client.info("memory")["used_memory"])
        return Sample(t, scored, offered, lag, cpu, backend_cpu, postgres, indexes, table, memory, int(self._client.dbsize()))

    def close(self) -> None:
        self._conn.close()


def window(first: Sample, last: Sample) -> dict:
    """What one transaction cost between two samples: CPU-µs per process (the producer's per
    transaction offered, everything else per transaction scored), PostgreSQL's WAL per row, and
    the state at the window's end."""
    scored = last.scored - first.scored
    offered = last.offered - first.offered
    seconds = last.t - first.t
    spent = usage(first.cpu, last.cpu, scored, seconds)
    per_row = 1.0 / scored if scored else 0.0
    cpu = {name: round(spent.cpu_us_per_tx[name], 2) for name in PROCESSES if name in spent.cpu_us_per_tx}
    if "producer" in spent.cpu_s:
        # None once nothing is offered any more (the drain after the last send: the producer has exited).
        cpu["producer"] = round(spent.cpu_s["producer"] * 1e6 / offered, 2) if offered else None
    backends = sum(last.backend_cpu_s[pid] - first.backend_cpu_s[pid] for pid in last.backend_cpu_s if pid in first.backend_cpu_s)
    cpu["postgres_backends"] = round(backends * 1e6 * per_row, 2)
    pg = {name: last.postgres[name] - first.postgres[name] for name in last.postgres}
    index_reads = pg["idx_blks_read"] + pg["idx_blks_hit"]
    return {
        "t": round(last.t, 1),
        "seconds": round(seconds, 2),
        "scored": scored,
        "offered": offered,
        "scored_per_s": round(scored / seconds, 1) if seconds else 0.0,
        "lag": last.lag,
        "cpu_us_per_tx": cpu,
        "pipeline_cpu_us_per_tx": round(spent.pipeline_cpu_us_per_tx, 2),
        "machine_utilisation": spent.as_dict()["machine_utilisation"],
        # Cores kept busy by what is not this run's (other people's work on a shared box).
        "other_cores": round(spent.other_cpu_s / seconds, 2) if seconds else 0.0,
        "redis_us_per_tx": {
            name: spent.redis_commands[name]["us_per_tx"] for name in REDIS_COMMANDS if name in spent.redis_commands
        },
        "wal_bytes_per_row": round(pg["wal_bytes"] * per_row, 1),
        "wal_fpi_per_row": round(pg["wal_fpi"] * per_row, 3),
        "checkpoints": pg["checkpoints"],
        "buffers_written_by_backends": pg["buffers_backend"],
        "index_blocks_read_outside_shared_buffers_pct": round(100.0 * pg["idx_blks_read"] / index_reads, 2)
        if index_reads
        else 0.0,
        "rows": last.scored,
        "table_mib": round(last.table_bytes / MIB, 1),
        "index_mib": {name: round(size / MIB, 1) for name, size in sorted(last.index_bytes.items())},
        "redis_mib": round(last.redis_memory / MIB, 1),
        "redis_keys": last.redis_keys,
    }


def line(w: dict) -> str:
    """A window in one line, for following a long run as it goes."""
    cpu = w["cpu_us_per_tx"]
    return (
        f"t {w['t']:6.0f}s  {w['scored_per_s']:8,.0f} tx/s  lag {w['lag']:>9,}  CPU-µs/tx: workers {cpu['workers']:6.1f}  "
        f"redis {cpu['redis']:5.1f}  postgres {cpu['postgres']:5.1f} (backends {cpu['postgres_backends']:5.1f})  "
        f"WAL {w['wal_bytes_per_row']:5.0f} B/row  FPI/row {w['wal_fpi_per_row']:.3f}  checkpoints {w['checkpoints']}  "
        f"rows {w['rows']:,}  other work {w['other_cores']:.2f} cores"
    )


def windows(samples: list[Sample], seconds: float) -> list[dict]:
    """``window`` over consecutive spans of about ``seconds`` (the last one may be shorter)."""
    out = []
    start = 0
    for k in range(1, len(samples)):
        if samples[k].t - samples[start].t >= seconds - 1e-6 or k == len(samples) - 1:
            out.append(window(samples[start], samples[k]))
            start = k
    return out
