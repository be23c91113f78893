"""``bench latency``: end-to-end latency under a fixed, open-loop offered load.

Latency is DESIGN.md's: PostgreSQL commit time minus the stream entry id's millisecond timestamp
(when Redis accepted the XADD). Each rate runs in a fresh namespace with its own ``fraudd run``,
fed by ``bench.producer`` on a fixed schedule.

Where the commit time comes from, best first:

- ``commit_timestamp``: with ``track_commit_timestamp = on``, PostgreSQL keeps every transaction's
  commit time, and ``pg_xact_commit_timestamp(xmin)`` gives each row's exactly, for every row, at
  no cost to the pipeline. Also yields the latency from the producer's schedule, which would expose
  a producer that fell behind (coordinated omission).
- ``worker_histogram``: otherwise, fraudd's own ``fraudd_end_to_end_latency_seconds``, scraped from
  ``/metrics``. Workers observe it right after the batch's XACK, so it is an upper bound of the
  commit latency by one Redis round trip; quantiles are interpolated within its buckets. A per-row
  lower bound is reported beside it: ``scored_at`` (stamped before the COPY) minus the entry time.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.namespace import Namespace
from bench.runners import ConsumerFailed, Consumers, GroupState, Setup, group_state, start_producer, tear_down, wait_drained
from bench.usage import Probe, usage
from fraudd.localservers import free_port

HISTOGRAM = "fraudd_end_to_end_latency_seconds"
SAMPLE_S = 0.1


@dataclass(frozen=True)
class Phase:
    fraction: float
    rate: float
    seconds: float
    warmup: float
    seed: int


def commit_timestamps_on(postgres_url: str) -> bool:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return conn.execute("SHOW track_commit_timestamp").fetchone()[0] == "on"


def scrape_histogram(port: int) -> tuple[list[float], list[float]]:
    """Cumulative bucket counts of the end-to-end latency histogram, summed over all workers."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == HISTOGRAM:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    bounds = sorted(buckets)
    return bounds, [buckets[b] for b in bounds]


def scrape_stage_seconds(port: int) -> dict[str, float]:
    """Seconds the workers spent in each stage of the batch loop (``fraudd_stage_duration_seconds``), summed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    seconds: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "fraudd_stage_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    stage = sample.labels["stage"]
                    seconds[stage] = seconds.get(stage, 0.0) + sample.value
    return seconds


def run_phase(setup: Setup, phase: Phase, exact: bool, stall_timeout: float = 60.0) -> dict:
    """One rate: start fraudd, offer the load, wait for the drain, then read the latencies."""
    client = setup.client
    ns = Namespace.fresh("lat", setup.redis_url, setup.postgres_url)
    ns.shards = setup.shards
    args = list(setup.fraudd_args)
    port = None
    if not exact:
        port = free_port()
        args += ["--metrics-port", str(port)]
    consumers = producer = None
    record_path = setup.log_dir / f"{ns.name}-producer.npz"
    try:
        ns.migrate()
        ns.create_group(client)
        consumers = Consumers.fraudd(ns, args, setup.workers, setup.log_dir / f"{ns.name}.log")
        consumers.wait_ready(client, ns)
        producer, t0 = start_producer(ns, phase.rate, phase.seconds, phase.seed, record_path)
        probe = Probe(client, ns.postgres_url, consumers.pids, supervised=True, producer=producer.pid)
        first = probe.snapshot()
        warm_histogram = None
        max_lag = max_pending = 0
        while producer.poll() is None:
            state = group_state(client, ns)
            max_lag, max_pending = max(max_lag, state.lag), max(max_pending, state.pending)
            if port is not None and warm_histogram is None and time.time() >= t0 + phase.warmup:
                warm_histogram = scrape_histogram(port)
            consumers.check_alive()
            time.sleep(SAMPLE_S)
        if producer.returncode != 0:
            raise ConsumerFailed(f"producer exited with {producer.returncode}")
        record = np.load(record_path)
        sent = int(record["sent"])

        def track(state: GroupState) -> None:
            nonlocal max_lag, max_pending
            max_lag, max_pending = max(max_lag, state.lag), max(max_pending, state.pending)

        wait_drained(client, ns, consumers, sent, stall_timeout, track)
        last = probe.snapshot()
        # The producer has exited and left /proc: its CPU comes from its own record.
        last.cpu_s["producer"] = float(record["cpu_s"])
        final_histogram = scrape_histogram(port) if port is not None else None
        consumers.stop()
        consumers = None

        result = {
            "fraction_of_max": phase.fraction,
            "namespace": ns.name,
            "target_rate": round(phase.rate, 1),
            "sent": sent,
            "send_seconds": round(float(record["sent_at"][-1] - t0), 3) if sent else 0.0,
            "warmup_s": phase.warmup,
            "max_lag_entries": max_lag,
            "max_pending_entries": max_pending,
            "producer_lag_ms": report.distribution_ms(record["sent_at"] - (t0 + record["first"] / phase.rate)),
            "usage": usage(first, last, sent, last.wall - first.wall).as_dict(),
        }
        rows = ns.sql(
            "SELECT stream_id, transaction_id, extract(epoch FROM scored_at)::float8"
            + (", extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8" if exact else "")
            + " FROM transactions"
        )
        result["rows"] = len(rows)
        entry_s = np.array([int(r[0].split("-", 1)[0]) for r in rows], dtype=np.float64) / 1000.0
        sequence = np.array([int(r[1].rsplit("_", 1)[1], 36) for r in rows], dtype=np.float64)
        due_s = t0 + sequence / phase.rate
        warm = due_s >= t0 + phase.warmup
        scored_s = np.array([r[2] for r in rows], dtype=np.float64)
        if exact:
            committed_s = np.array([r[3] for r in rows], dtype=np.float64)
            result["latency_source"] = "commit_timestamp"
            result["latency_ms"] = report.distribution_ms((committed_s - entry_s)[warm])
            result["latency_cdf"] = report.cdf_ms((committed_s - entry_s)[warm])
            result["latency_from_schedule_ms"] = report.distribution_ms((committed_s - due_s)[warm])
        else:
            bounds, counts = final_histogram
            if warm_histogram is not None and warm_histogram[0] == bounds:
                counts = [c - w for c, w in zip(counts, warm_histogram[1])]
            result["latency_source"] = "worker_histogram"
            result["latency_ms"] = report.histogram_quantiles_ms(bounds, counts)
            result["latency_cdf"] = report.histogram_cdf_ms(bounds, counts)
        result["scored_minus_entry_ms"] = report.distribution_ms((scored_s - entry_s)[warm])
        return result
    finally:
        tear_down(client, ns, producer, consumers, record_path)


def run(setup: Setup, max_rate: float, fractions: list[float], seconds: float, warmup: float, seed: int) -> dict:
    exact = commit_timestamps_on(setup.postgres_url)
    if not exact:
        setup.echo("track_commit_timestamp is off: latency from fraudd's own histogram (an upper bound, bucketed)")
    phases = []
    for i, fraction in enumerate(fractions):
        phase = Phase(fraction, max_rate * fraction, seconds, warmup, seed + i)
        setup.echo(f"  {fraction:.0%} of {max_rate:,.0f} tx/s = {phase.rate:,.0f} tx/s for {seconds:g}s ...")
        result = run_phase(setup, phase, exact)
        lat = result["latency_ms"]
        setup.echo(f"    p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, max lag {result['max_lag_entries']}")
        phases.append(result)
    return {"max_rate": max_rate, "latency_source": "commit_timestamp" if exact else "worker_histogram", "phases": phases}
