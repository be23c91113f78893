"""Prometheus metrics, shared by the supervisor and its workers through multiprocess mode.

prometheus-client picks its storage when it is first imported, so ``fraudd run`` sets
``PROMETHEUS_MULTIPROC_DIR`` before anything imports this module; every forked worker then
writes its own files there and the supervisor's ``/metrics`` sums them.
Observations are made once per batch: a histogram takes a whole batch of latencies with one
``np.histogram`` pass instead of one ``observe`` per transaction.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)

STAGES = ("read", "decode", "features", "inference", "copy", "settle")


transactions = Counter("fraudd_transactions_total", "Transactions scored, by decision.", ["decision"])
dead_letters = Counter("fraudd_dead_letters_total", "Entries written to the DLQ, by reason.", ["reason"])
duplicates = Counter("fraudd_duplicates_total", "Transactions already seen within the dedup window (redeliveries and producer duplicates).")
reclaimed = Counter("fraudd_reclaimed_entries_total", "Pending entries taken over from other consumers.")
alerts_written = Counter("fraudd_alerts_written_total", "Entries written to the fraud alert stream.")
errors = Counter("fraudd_errors_total", "Infrastructure errors met by workers, by component and kind.", ["component", "kind"])
batch_failures = Counter("fraudd_batch_failures_total", "Batches that failed as a whole and were bisected.")
worker_restarts = Counter("fraudd_worker_restarts_total", "Workers respawned by the supervisor after dying.")
reloads = Counter("fraudd_reloads_total", "Rules/model reloads on SIGHUP, by outcome.", ["outcome"])

e2e_latency = Histogram(
    "fraudd_end_to_end_latency_seconds",
    "PostgreSQL commit time minus the time Redis accepted the entry (its stream id).",
    buckets=LATENCY_BUCKETS,
)
stage_duration = Histogram("fraudd_stage_duration_seconds", "Time one batch spends in each stage.", ["stage"], buckets=STAGE_BUCKETS)
batch_size = Histogram("fraudd_batch_size", "Entries per batch read.", buckets=BATCH_SIZE_BUCKETS)

model_info = Gauge("fraudd_model_info", "Model in use (value 1), by version.", ["version"], multiprocess_mode="max")
rules_info = Gauge("fraudd_rules_info", "Rules in use (value 1), by version.", ["version"], multiprocess_mode="max")
workers_alive = Gauge("fraudd_workers_alive", "Worker processes alive.", multiprocess_mode="liveall")
group_lag = Gauge("fraudd_group_lag", "Entries of the stream not yet delivered to the consumer group.", multiprocess_mode="max")
group_pending = Gauge("fraudd_group_pending", "Entries delivered but not yet acknowledged.", multiprocess_mode="max")
oldest_pending_age = Gauge("fraudd_oldest_pending_age_seconds", "Age of the oldest pending entry.", multiprocess_mode="max")
dependency_up = Gauge("fraudd_dependency_up", "Whether Redis / PostgreSQL answered the last check.", ["dependency"], multiprocess_mode="max")


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Add a whole batch of observations to ``histogram`` with one histogram pass.

    prometheus-client stores per-bucket counts and a sum; incrementing those directly is exactly
    what ``observe`` does per value, done once per bucket instead of once per value.
    """
    if values.size == 0:
        return
    bounds = histogram._upper_bounds  # ascending, the last one +Inf; a value counts in the first bound >= it
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))
