"""Smoke runs of ``python -m bench``: every mode produces a report with sane fields.

No performance thresholds: on a shared 2-core box the figures move too much for that; performance
is judged from full runs on a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import psycopg
import pytest
import redis

from bench import pg_writes

from .conftest import POSTGRES_URL, REDIS_URL

REPO = Path(__file__).resolve().parent.parent
# A fixed maximum: the smoke runs must not depend on an earlier throughput report.
MAX_RATE = "4000"


def bench(tmp_path: Path, *args: str, timeout: float = 60, pictures: bool = True) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench",
        *args,
        "--redis-url",
        REDIS_URL,
        "--postgres-url",
        POSTGRES_URL,
        "--out-dir",
        str(tmp_path),
        *(["--pictures-dir", str(tmp_path)] if pictures else []),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert path.parent == tmp_path
    return orjson.loads(path.read_bytes())


def assert_dropped(namespace: str) -> None:
    """The run removed its streams, keys and schema."""
    client = redis.Redis.from_url(REDIS_URL)
    assert not client.exists(f"{namespace}:transactions:raw")
    assert not list(client.scan_iter(match=f"fraudd:{{{namespace}:transactions:raw}}:*", count=10_000))
    with psycopg.connect(POSTGRES_URL) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (namespace,)).fetchone()[0] == 0


def assert_usage(usage: dict) -> None:
    assert usage["transactions"] > 0 and usage["seconds"] > 0
    assert usage["pipeline_cpu_us_per_tx"] > 0
    assert {"supervisor", "workers", "redis"} <= set(usage["cpu_us_per_tx"])
    assert usage["cpu_us_per_tx"]["workers"] > 0


def test_throughput(tmp_path: Path) -> None:
    report = bench(tmp_path, "throughput", "-n", "5000", "--naive-transactions", "300", "--workers", "2")
    assert report["mode"] == "throughput" and report["workers"] == 2
    assert report["machine"]["nproc"] >= 1 and report["machine"]["redis"]["version"]
    result = report["result"]
    assert set(result["drains"]) == {"bare", "fraudd", "naive"}
    for drain in result["drains"].values():
        assert drain["rate_tx_per_s"] > 0
        assert drain["processes"] == 2
        # CPU time comes in 10 ms ticks: the bare drain of 5,000 entries can fit between two.
        assert drain["pipeline_cpu_us_per_tx"] >= 0
        assert_dropped(drain["namespace"])
    assert_usage(result["drains"]["fraudd"])
    assert set(result["ratios"]) == {"fraudd_over_bare", "fraudd_over_naive"}
    checks = result["checks"]
    assert checks["produced"] == 5000 and checks["rows"] == 5000
    assert checks["exactly_once"] and checks["missing"] == 0 and checks["duplicate_rows"] == 0
    assert 0.0 <= checks["recall"] <= 1.0 and 0.0 <= checks["precision"] <= 1.0
    (node,) = result["drains"]["fraudd"]["redis_nodes"].values()
    assert node["role"] == "master" and node["transactions"] == 5000 and node["shards"] == [0]
    assert node["streams"] == ["fraud", "dlq"]
    stages = result["drains"]["fraudd"]["worker_stages_cpu_us_per_tx"]
    assert {"decode", "features", "inference", "copy", "settle"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(result["drains"]["fraudd"]["cpu_us_per_tx"]["workers"], rel=0.01)
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")


def test_throughput_on_a_redis_cluster(tmp_path: Path) -> None:
    report = bench(
        tmp_path,
        "throughput",
        "--redis-cluster-masters",
        "2",
        "--redis-cluster-replicas",
        "1",
        "-n",
        "3000",
        "--workers",
        "2",
        "--shards",
        "4",
    )
    assert report["services"]["redis_cluster"] == {"masters": 2, "replicas": 1}
    assert "--redis-cluster" in report["fraudd_args"]
    result = report["result"]
    assert set(result["drains"]) == {"fraudd"} and result["ratios"] == {}
    drain = result["drains"]["fraudd"]
    assert_usage(drain)
    nodes = drain["redis_nodes"]
    assert [node["role"] for node in nodes.values()] == ["master", "master", "slave", "slave"]
    # Every shard on exactly one master, every transaction counted on its shard's master.
    assert sorted(shard for node in nodes.values() for shard in node["shards"]) == [0, 1, 2, 3]
    assert sum(node["transactions"] for node in nodes.values()) == 3000
    assert all(node["keys"] > 0 and node["used_memory_bytes"] > 0 and node["cpu_us_per_tx"] >= 0 for node in nodes.values())
    assert sorted(stream for node in nodes.values() for stream in node["streams"]) == ["dlq", "fraud"]
    # The replicas (listed last) serve no shard of their own.
    assert all(node["shards"] == [] and node["cpu_us_per_own_tx"] is None for node in list(nodes.values())[2:])
    assert sum(node["cpu_s"] for node in nodes.values()) == pytest.approx(drain["cpu_s"]["redis"], abs=0.01)
    checks = result["checks"]
    assert checks["produced"] == checks["rows"] == 3000
    assert checks["exactly_once"] and checks["missing"] == 0 and checks["duplicate_rows"] == 0


def test_latency(tmp_path: Path) -> None:
    report = bench(
        tmp_path, "latency", "--max-rate", MAX_RATE, "--rates", "0.1", "--seconds", "3", "--warmup", "0.5", "--workers", "1"
    )
    result = report["result"]
    assert result["max_rate"] == float(MAX_RATE) and result["max_rate_source"] == "--max-rate"
    (phase,) = result["phases"]
    assert phase["sent"] == phase["rows"] == 1200
    latency = phase["latency_ms"]
    assert latency["count"] > 0
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["p99.9"]
    assert phase["producer_lag_ms"]["count"] > 0
    cdf = phase["latency_cdf"]
    assert 0 < cdf["fraction"][-1] <= 1.0 and cdf["ms"] == sorted(cdf["ms"])
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert_usage(phase["usage"])
    assert_dropped(phase["namespace"])


def test_soak(tmp_path: Path) -> None:
    report = bench(
        tmp_path, "soak", "--max-rate", MAX_RATE, "--minutes", str(5 / 60), "--interval", "1", "--workers", "2", timeout=180
    )
    result = report["result"]
    assert result["sent"] == result["rows"] == 10_000 and result["exactly_once"]
    assert len(result["worker_rss"]) == 2
    for worker in result["worker_rss"]:
        assert 10 < worker["first_window_mib"] < 2000 and worker["max_mib"] >= worker["last_window_mib"]
    assert result["max_lag_entries"] >= 0 and len(result["samples"]) >= 3
    assert_usage(result["usage"])
    # The cost per transaction over time: windows of the send, and the drain's, which ends with
    # every row stored.
    assert len(result["per_sample"]) >= 2 and result["per_minute"]
    assert result["drain_window"]["rows"] == result["rows"]
    # Over a whole minute (here the run) the workers' CPU and the WAL show; a one-second window
    # can fall between two of the kernel's 10 ms ticks.
    whole = result["per_minute"][0]
    assert whole["scored"] > 0 and whole["cpu_us_per_tx"]["workers"] > 0 and whole["wal_bytes_per_row"] > 0
    assert result["drain_window"]["index_mib"]["transactions_pkey"] > 0
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert_dropped(result["namespace"])


def test_copy_growth(tmp_path: Path) -> None:
    report = bench(tmp_path, "copy-growth", "--total", "4000", "--step", "2000", "--rows", "500", pictures=False)
    steps = report["result"]["steps"]
    assert [s["rows"] for s in steps] == [2000, 4000]
    for step in steps:
        assert step["server_cpu_us_per_row"] > 0 and step["wal_bytes_per_row"] > 0
        assert step["partition_index_mib"]["transactions_pkey"] > 0


def test_the_write_counters_are_read_with_the_query_of_the_servers_version() -> None:
    """This server's counters read; PostgreSQL 17's are asked where 17 keeps them (only the text can
    be checked here: the machine runs 15)."""
    with psycopg.connect(POSTGRES_URL) as conn:
        counters = pg_writes.WriteCounters(conn).read()
    assert list(counters) == list(pg_writes.NAMES) and min(counters.values()) >= 0
    for version in (150004, 160000):
        assert "pg_stat_checkpointer" not in pg_writes.query(version)
    assert "FROM pg_stat_checkpointer" in pg_writes.query(170000) and "FROM pg_stat_io" in pg_writes.query(170002)
    assert "buffers_backend" not in pg_writes.query(170000) and "checkpoints_" not in pg_writes.query(170000)
