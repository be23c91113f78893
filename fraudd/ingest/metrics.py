"""The HTTP ingest's metrics (``/metrics``), beside the runtime's.

With ``--workers`` > 1 every process writes its own files in ``PROMETHEUS_MULTIPROC_DIR`` and any
of them answers ``/metrics`` with the sum (``runtime.metrics.multiprocess_registry``).
"""

from __future__ import annotations

import collections

import numpy as np
from prometheus_client import Counter, Histogram

from ..runtime.metrics import observe_many

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTES = ("/v1/transactions", "/v1/transactions/batch", "/v1/score", "/v1/labels")

requests = Counter("fraudd_ingest_requests_total", "HTTP requests answered, by route and status code.", ["route", "status"])
request_duration = Histogram(
    "fraudd_ingest_request_duration_seconds",
    "Time from a request's arrival to its answer, by route.",
    ["route"],
    buckets=REQUEST_BUCKETS,
)
transactions = Counter(
    "fraudd_ingest_transactions_total",
    "Transactions received, by outcome: written to the stream, duplicate (not written again), conflict (a "
    "transaction_id accepted earlier with another body, not written), rejected (invalid).",
    ["outcome"],
)
decisions = Counter(
    "fraudd_ingest_decisions_total",
    "Synchronous decisions (/v1/score), by outcome: answered (the worker's or the stored one) or timed_out (the fallback).",
    ["outcome"],
)

for _route in ROUTES:
    request_duration.labels(_route)
for _outcome in ("written", "duplicate", "conflict", "rejected"):
    transactions.labels(_outcome)
for _outcome in ("answered", "timed_out"):
    decisions.labels(_outcome)


class Tally:
    """One process's counts, added to the metrics above once per ``flush`` rather than per request.

    In multiprocess mode every prometheus-client update writes a memory-mapped file behind a lock
    (≈ 3 µs); four of them per request were a tenth of the ingest's CPU. The process flushes every
    second, before answering ``/metrics`` and when it stops.
    """

    def __init__(self) -> None:
        self._requests: collections.Counter = collections.Counter()
        self._durations: dict[str, list[float]] = collections.defaultdict(list)
        self.transactions: collections.Counter = collections.Counter()
        self.decisions: collections.Counter = collections.Counter()

    def request(self, route: str, status: int, seconds: float) -> None:
        self._requests[route, status] += 1
        self._durations[route].append(seconds)

    def flush(self) -> None:
        requests_, self._requests = self._requests, collections.Counter()
        durations, self._durations = self._durations, collections.defaultdict(list)
        for (route, status), count in requests_.items():
            requests.labels(route, str(status)).inc(count)
        for route, seconds in durations.items():
            observe_many(request_duration.labels(route), np.array(seconds))
        for counter, tallied in ((transactions, self.transactions), (decisions, self.decisions)):
            for outcome, count in tallied.items():
                if count:
                    counter.labels(outcome).inc(count)
            tallied.clear()
