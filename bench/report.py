"""Reports: the JSON written to ``bench/out/`` and the table printed for humans."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import psycopg
import redis

OUT_DIR = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("redis", "hiredis", "psycopg", "psycopg-binary", "onnxruntime", "numpy", "orjson", "click")
QUANTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))


def out_path(out_dir: Path, mode: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def document(mode: str, started: float, describe_machine: Callable[[], dict], result: dict, **context: object) -> dict:
    """A mode's report: the command that ran it, ``context`` (its fraudd flags, the services),
    when it started and how long it took, the machine and the result. The machine is described
    after the run's wall time is taken, which therefore does not count it."""
    return {
        "mode": mode,
        "command": ["python", "-m", "bench", *sys.argv[1:]],
        **context,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "machine": describe_machine(),
        "result": result,
    }


def write(path: Path, report: dict) -> Path:
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def distribution_ms(seconds: np.ndarray) -> dict:
    """Quantiles (nearest rank: always an observed value) and max of latencies given in seconds."""
    if len(seconds) == 0:
        return {"count": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    out = {"count": int(len(ms))}
    for name, q in QUANTILES:
        out[name] = round(float(np.percentile(ms, q, method="higher")), 3)
    out["max"] = round(float(ms.max()), 3)
    out["mean"] = round(float(ms.mean()), 3)
    return out


def cdf_ms(seconds: np.ndarray) -> dict:
    """Points of the latency CDF (ms, fraction at or below), dense enough in the tail for a plot."""
    if len(seconds) == 0:
        return {"ms": [], "fraction": []}
    fractions = np.unique(np.concatenate([np.linspace(0.0, 1.0, 201), [0.995, 0.998, 0.999, 0.9995, 0.9999]]))
    ms = np.quantile(np.asarray(seconds, dtype=np.float64) * 1000.0, fractions, method="higher")
    return {"ms": np.round(ms, 3).tolist(), "fraction": fractions.round(5).tolist()}


def histogram_cdf_ms(bounds: list[float], counts: list[float]) -> dict:
    """The CDF of a cumulative Prometheus histogram at its finite bucket bounds."""
    total = counts[-1] if counts else 0
    finite = [(b, c) for b, c in zip(bounds, counts) if b != float("inf")]
    return {"ms": [b * 1000.0 for b, _ in finite], "fraction": [c / total if total else 0.0 for _, c in finite]}


def histogram_quantiles_ms(bounds: list[float], counts: list[float]) -> dict:
    """Quantiles of a cumulative Prometheus histogram, interpolated within buckets as
    ``histogram_quantile`` does; ``max`` is the upper bound of the highest non-empty bucket."""
    total = counts[-1] if counts else 0
    if not total:
        return {"count": 0}
    out: dict = {"count": int(total)}
    for name, q in QUANTILES:
        rank = total * q / 100.0
        i = next(k for k, c in enumerate(counts) if c >= rank)
        lower = bounds[i - 1] if i else 0.0
        below = counts[i - 1] if i else 0.0
        upper = bounds[i]
        if upper == float("inf"):
            value = lower
        else:
            value = lower + (upper - lower) * (rank - below) / max(counts[i] - below, 1e-12)
        out[name] = round(value * 1000.0, 3)
    top = next(k for k, c in enumerate(counts) if c >= total)
    out["max_at_most"] = bounds[top] * 1000.0 if bounds[top] != float("inf") else None
    return out


def machine(client: redis.Redis, postgres_url: str) -> dict:
    """What the figures were measured on: hardware, versions, and the settings that move them."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info = client.info("server")
    persistence = client.info("persistence")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        pg_settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', "
                "'track_commit_timestamp', 'shared_buffers', 'wal_level', 'max_wal_size')"
            ).fetchall()
        )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": packages,
        "redis": {"version": info["redis_version"], "aof_enabled": bool(persistence.get("aof_enabled"))},
        "postgresql": {"version": pg_version, **pg_settings},
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "git": _git(),
    }


def _git() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": run("rev-parse", "HEAD"), "dirty_files": run("status", "--porcelain").splitlines()}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
