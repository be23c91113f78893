"""The HTTP ingest's metrics (``/metrics``), beside the runtime's.

With ``--workers`` > 1 every process writes its own files in ``PROMETHEUS_MULTIPROC_DIR`` and any
of them answers ``/metrics`` with the sum (``runtime.metrics.multiprocess_registry``).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTES = ("/v1/transactions", "/v1/transactions/batch", "/v1/score")

requests = Counter("fraudd_ingest_requests_total", "HTTP requests answered, by route and status code.", ["route", "status"])
request_duration = Histogram("fraudd_ingest_request_duration_seconds", "Time from a request's arrival to its answer, by route.",
                             ["route"], buckets=REQUEST_BUCKETS)
transactions = Counter("fraudd_ingest_transactions_total",
                       "Transactions received, by outcome: written to the stream, duplicate (not written again), rejected (invalid).",
                       ["outcome"])
decisions = Counter("fraudd_ingest_decisions_total",
                    "Synchronous decisions (/v1/score), by outcome: answered (the worker's or the stored one) or timed_out (the fallback).",
                    ["outcome"])

for _route in ROUTES:
    request_duration.labels(_route)
for _outcome in ("written", "duplicate", "rejected"):
    transactions.labels(_outcome)
for _outcome in ("answered", "timed_out"):
    decisions.labels(_outcome)
