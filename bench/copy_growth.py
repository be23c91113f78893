"""``python -m bench copy-growth``: PostgreSQL's cost per row of the workers' COPY as a day's partition fills.

A day's partition of ``transactions`` takes every transaction of that day, and its primary key
``(transaction_id, event_time)`` is keyed by random ids, as is ``(user_id, event_time)`` by users:
each row lands on a leaf page anywhere in both. While the partition's indexes fit in
shared_buffers every such page is at hand; past that, a COPY reads most of them back (from the
OS cache, or the disk) and writes dirty ones out to make room, and after each checkpoint logs the
whole page again the first time it changes (``full_page_writes``). This fills one partition with
batches of scored transactions, as the workers' binary COPY does (``sinks._copy_binary``), and
reports for each step of ``step`` rows what the server process spent per row (its CPU from
``/proc/<pid>/schedstat``), the WAL and full-page images it wrote (pg_stat_wal), the index blocks
it found outside shared_buffers and the buffers it had to write itself, against the rows the
partition holds and the size of its indexes. Run it on a private server (``--private-services``),
where the WAL and the buffer counters are this COPY's alone.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import psycopg
import redis

from bench import procstat
from bench.copy_indexes import generated_scored_batch
from bench.namespace import Namespace
from bench.pg_writes import WriteCounters
from fraudd.schema import connect
from fraudd.scoring.sinks import _COLUMN_LIST, _copy_binary

MIB = 2**20
USERS = 5_000_000
_COUNTERS = """
SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, (SELECT wal_fpi FROM pg_stat_wal),
       (SELECT coalesce(sum(idx_blks_read), 0)::bigint FROM pg_statio_all_indexes WHERE schemaname = current_schema()),
       (SELECT coalesce(sum(idx_blks_hit), 0)::bigint FROM pg_statio_all_indexes WHERE schemaname = current_schema())
"""
# The partition that holds the most rows: the day being filled.
_PARTITION_INDEXES = """
SELECT parent.relname, pg_relation_size(c.oid)
  FROM pg_index x
  JOIN pg_class c ON c.oid = x.indexrelid
  JOIN pg_inherits i ON i.inhrelid = c.oid
  JOIN pg_class parent ON parent.oid = i.inhparent
 WHERE x.indrelid = %s::regclass
"""


def run(redis_url: str, postgres_url: str, rows: int, total: int, step: int, echo) -> dict:
    """Fill one day's partition with ``total`` rows in COPYs of ``rows``; figures per ``step`` rows."""
    ns = Namespace.fresh("copy_growth", redis_url, postgres_url)
    client = redis.Redis.from_url(redis_url, protocol=2)
    steps = []
    try:
        ns.migrate()
        scored = generated_scored_batch(ns, client, rows)
        rng = np.random.default_rng(11)
        with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            backend = int(_one(conn, "SELECT pg_backend_pid()"))
            writes = WriteCounters(conn)
            done = 0
            while done < total:
                before, cpu_before, started = _counters(conn, writes), procstat.run_s(backend), time.perf_counter()
                copy_s = 0.0
                for _ in range(step // rows):
                    # Random ids (a gateway's UUIDs) and users drawn from millions: each row lands on a
                    # leaf anywhere in both indexes, as in a day's partition of production traffic.
                    # (The generator's own ids count up, so its rows would all go to the rightmost leaf.)
                    scored.batch.transaction_id = [uuid.uuid4().hex for _ in range(rows)]
                    scored.batch.user_id = [f"user_{u}" for u in rng.integers(0, USERS, rows).tolist()]
                    payload = _copy_binary([scored])
                    copy_started = time.perf_counter()
                    with conn.cursor().copy(f"COPY transactions ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(payload)
                    copy_s += time.perf_counter() - copy_started
                done += step
                cpu, after = procstat.run_s(backend) - cpu_before, _counters(conn, writes)
                spent = {name: after[name] - before[name] for name in after}
                index_reads = spent["idx_blks_read"] + spent["idx_blks_hit"]
                sizes = _index_sizes(conn, _fullest_partition(conn))
                steps.append(
                    {
                        "rows": done,
                        "server_cpu_us_per_row": round(cpu / step * 1e6, 2),
                        "copy_wall_us_per_row": round(copy_s / step * 1e6, 2),
                        "wal_bytes_per_row": round(spent["wal_bytes"] / step, 1),
                        "wal_fpi_per_row": round(spent["wal_fpi"] / step, 3),
                        "checkpoints": spent["checkpoints"],
                        "buffers_written_by_backend_per_row": round(spent["buffers_backend"] / step, 3),
                        "index_blocks_read_per_row": round(spent["idx_blks_read"] / step, 3),
                        "index_blocks_read_outside_shared_buffers_pct": round(100.0 * spent["idx_blks_read"] / index_reads, 2)
                        if index_reads
                        else 0.0,
                        "partition_index_mib": {name: round(size / MIB, 1) for name, size in sizes.items()},
                        "step_wall_s": round(time.perf_counter() - started, 1),
                    }
                )
                echo(format_step(steps[-1]))
            settings = dict(
                conn.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
                    "('shared_buffers', 'max_wal_size', 'checkpoint_timeout', 'full_page_writes', 'wal_compression')"
                ).fetchall()
            )
    finally:
        ns.drop(client)
        client.close()
    return {"rows_per_copy": rows, "total": total, "step": step, "postgresql": settings, "steps": steps}


def _one(conn: psycopg.Connection, sql: str) -> object:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _counters(conn: psycopg.Connection, writes: WriteCounters) -> dict[str, int]:
    # This backend's own statistics reach the views when it next reports them: now.
    conn.execute("SELECT pg_stat_force_next_flush()")
    row = conn.execute(_COUNTERS).fetchone()
    assert row is not None
    names = ("wal_bytes", "wal_fpi", "idx_blks_read", "idx_blks_hit")
    return dict(zip(names, (int(v) for v in row))) | writes.read()


def _fullest_partition(conn: psycopg.Connection) -> str:
    """The partition being filled (the batch's event times are of the last hours: one day's)."""
    return str(
        _one(
            conn,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'transactions'::regclass ORDER BY pg_relation_size(c.oid) DESC LIMIT 1",
        )
    )


def _index_sizes(conn: psycopg.Connection, partition: str) -> dict[str, int]:
    """Each index of ``partition`` by the name of the index of ``transactions`` it belongs to."""
    return {name: int(size) for name, size in conn.execute(_PARTITION_INDEXES, (partition,)).fetchall()}


def format_step(step: dict) -> str:
    sizes = step["partition_index_mib"]
    return (
        f"  {step['rows']:>11,} rows: server CPU {step['server_cpu_us_per_row']:6.2f} µs/row  COPY wall "
        f"{step['copy_wall_us_per_row']:6.2f} µs/row  WAL {step['wal_bytes_per_row']:6.0f} B/row  FPI/row "
        f"{step['wal_fpi_per_row']:.3f}  checkpoints {step['checkpoints']}  index blocks read/row "
        f"{step['index_blocks_read_per_row']:.3f} ({step['index_blocks_read_outside_shared_buffers_pct']:.1f}% of index "
        f"reads)  backend writes/row {step['buffers_written_by_backend_per_row']:.3f}  "
        f"pkey {sizes.get('transactions_pkey', 0):.0f} MiB  user_time {sizes.get('transactions_user_time', 0):.0f} MiB"
    )
