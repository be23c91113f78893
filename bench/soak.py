"""``bench soak``: a long run at a fixed share of the maximum rate, watching for slow leaks.

Every few seconds it samples each worker's RSS, the group's lag and pending count and Redis's
memory. The producer writes the stream itself, as the origin design's does: what keeps Redis
bounded is fraudd run's own trimming (``--retention-s``) and the expiry of its dedup markers
(``--dedup-window-s``). Both default to an hour, longer than a soak, so unless given after the
command the soak runs fraudd with a retention and a window short enough (``steady_state_args``)
for Redis to reach its steady state within the run: flat from then on, or something leaks.
The alert stream is the one exception: ``fraudd alerts`` trims it once delivered, and the soak
runs no alert service, so its memory is sampled apart and left out of the figure that must be flat.
Growth is the mean of the last window minus the mean of the first; a window is a minute, or a
third of a shorter run.

Every sample also feeds ``bench.trend``: each process's CPU per transaction, PostgreSQL's WAL,
checkpoints and index sizes, Redis's keys, per minute (``per_minute``) and per sample
(``per_sample``) while the producer sends, and over the drain after its last send
(``drain_window``). A cost per transaction
that rises with time or with the data stored is a defect even while the run keeps up.
"""

from __future__ import annotations

import time

import numpy as np

from bench import procstat, trend
from bench.namespace import Namespace
from bench.runners import ConsumerFailed, Consumers, Setup, group_state, start_producer, tear_down, wait_drained
from bench.usage import Probe, usage

MIB = 2**20


def steady_state_args(fraudd_args: list[str], seconds: float) -> list[str]:
    """``fraudd_args`` plus a ``--retention-s`` of 5 s and a ``--dedup-window-s`` of a tenth of the run
    (at least 10 s) where they do not set them: a marker lives its window plus the minute its bucket
    keeps receiving, so Redis levels off about a window and a minute and a half into the run."""
    added = []
    if not any(arg.startswith("--retention-s") for arg in fraudd_args):
        added += ["--retention-s", "5"]
    if not any(arg.startswith("--dedup-window-s") for arg in fraudd_args):
        added += ["--dedup-window-s", str(max(10, int(seconds / 10)))]
    return [*fraudd_args, *added]


def _growth(times: np.ndarray, values: np.ndarray, window: float) -> dict:
    first = values[times <= times[0] + window]
    last = values[times >= times[-1] - window]
    return {
        "first_window_mib": round(float(first.mean()) / MIB, 2),
        "last_window_mib": round(float(last.mean()) / MIB, 2),
        "growth_mib": round(float(last.mean() - first.mean()) / MIB, 2),
        "growth_pct": round(float(last.mean() / first.mean() - 1.0) * 100.0, 2) if first.mean() else None,
        "max_mib": round(float(values.max()) / MIB, 2),
    }


def run(
    setup: Setup, rate: float, fraction: float, seconds: float, interval: float, seed: int, stall_timeout: float = 120.0
) -> dict:
    client = setup.client
    ns = Namespace.fresh("soak", setup.redis_url, setup.postgres_url)
    consumers = producer = sampler = None
    record_path = setup.log_dir / f"{ns.name}-producer.npz"
    try:
        ns.migrate()
        ns.create_group(client)
        fraudd_args = steady_state_args(setup.fraudd_args, seconds)
        consumers = Consumers.fraudd(ns, fraudd_args, setup.workers, setup.log_dir / f"{ns.name}.log")
        consumers.wait_ready(client, ns)
        producer, t0 = start_producer(ns, rate, seconds, seed, record_path)
        probe = Probe(client, ns.postgres_url, consumers.pids, supervised=True, producer=producer.pid)
        first = probe.snapshot()
        sampler = trend.Sampler(probe, client, ns.postgres_url, ns.schema)
        trend_samples: list[trend.Sample] = []
        minute_from = 0  # the sample the current minute's line starts at
        samples: list[dict] = []
        workers_seen: set[int] = set()
        next_sample = time.monotonic()
        while producer.poll() is None:
            consumers.check_alive()
            if time.monotonic() >= next_sample:
                workers = consumers.worker_pids()
                workers_seen.update(workers)
                state = group_state(client, ns)
                t = time.time() - t0
                trend_samples.append(sampler.take(t, state.acked, state.entries_read + state.lag, state.lag))
                if t - trend_samples[minute_from].t >= 60.0:
                    setup.echo(trend.line(trend.window(trend_samples[minute_from], trend_samples[-1])))
                    minute_from = len(trend_samples) - 1
                samples.append(
                    {
                        "t": round(t, 2),
                        "worker_rss": [procstat.rss_bytes(pid) or 0 for pid in sorted(workers)],
                        "supervisor_rss": procstat.rss_bytes(consumers.pids[0]) or 0,
                        "lag": state.lag,
                        "pending": state.pending,
                        "redis_used_memory": int(client.info("memory")["used_memory"]),
                        "alert_stream_memory": int(client.memory_usage(ns.fraud_stream) or 0),
                    }
                )
                next_sample += interval
            time.sleep(0.05)
        if producer.returncode != 0:
            raise ConsumerFailed(f"producer exited with {producer.returncode}")
        sent = int(np.load(record_path)["sent"])
        drained = wait_drained(client, ns, consumers, sent, stall_timeout)
        drained_after = time.time() - t0 - seconds
        drained_sample = sampler.take(time.time() - t0, drained.acked, drained.entries_read, 0)
        last = probe.snapshot()
        # The producer has exited and left /proc: its CPU comes from its own record.
        last.cpu_s["producer"] = float(np.load(record_path)["cpu_s"])
        exit_codes = consumers.stop()
        consumers = None

        times = np.array([s["t"] for s in samples])
        window = min(60.0, seconds / 3.0)
        widths = {len(s["worker_rss"]) for s in samples}
        per_worker = []
        if len(widths) == 1:
            rss = np.array([s["worker_rss"] for s in samples], dtype=np.float64)
            per_worker = [_growth(times, rss[:, k], window) for k in range(rss.shape[1])]
        rows, distinct = ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0]
        return {
            "fraction_of_max": fraction,
            "fraudd_args": fraudd_args,
            "namespace": ns.name,
            "target_rate": round(rate, 1),
            "seconds": seconds,
            "sent": sent,
            "achieved_rate": round(sent / seconds, 1),
            "sample_interval_s": interval,
            "growth_window_s": window,
            "worker_rss": per_worker,
            "worker_processes_seen": len(workers_seen),
            "supervisor_rss": _growth(times, np.array([s["supervisor_rss"] for s in samples], dtype=np.float64), window),
            "redis_used_memory": _growth(times, np.array([s["redis_used_memory"] for s in samples], dtype=np.float64), window),
            "redis_without_alert_stream": _growth(
                times, np.array([s["redis_used_memory"] - s["alert_stream_memory"] for s in samples], dtype=np.float64), window
            ),
            "max_lag_entries": max(s["lag"] for s in samples),
            "max_pending_entries": max(s["pending"] for s in samples),
            "drained_s_after_last_send": round(drained_after, 2),
            "rows": rows,
            "duplicate_rows": rows - distinct,
            "exactly_once": rows == distinct == sent,
            "exit_codes": exit_codes,
            "usage": usage(first, last, sent, last.wall - first.wall).as_dict(),
            "per_minute": trend.windows(trend_samples, 60.0),
            "per_sample": trend.windows(trend_samples, interval),
            "drain_window": trend.window(trend_samples[-1], drained_sample),
            "samples": samples,
        }
    finally:
        if sampler is not None:
            sampler.close()
        tear_down(client, ns, producer, consumers, record_path)
