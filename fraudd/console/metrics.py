"""The console's metrics (``/metrics`` on ``--metrics-port``, summed over its processes).

The queue gauges (depth, oldest open case and SLA per queue) are set by the supervisor's
housekeeping from its counts (``queue.store_tallies``); the
verdict counters and time-to-verdict by the server process that took the verdict.
"""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import Counter, Gauge, Histogram

from .queue import DECISIONS, STATES

# Minutes to days: a case waits from seconds (claimed at once) to past a day's SLA.
VERDICT_BUCKETS = (30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)

queue_depth = Gauge(
    "fraudd_console_queue_depth",
    "Unresolved cases, by queue (decision) and state.",
    ["decision", "state"],
    multiprocess_mode="livemax",
)
oldest_open_age = Gauge(
    "fraudd_console_oldest_open_case_age_seconds",
    "Age of the oldest open (unclaimed) case, by queue (decision).",
    ["decision"],
    multiprocess_mode="livemax",
)
sla_seconds = Gauge(
    "fraudd_console_sla_seconds",
    "The SLA a case should get its verdict within, by queue (decision): as a lead set it, else --sla-minutes.",
    ["decision"],
    multiprocess_mode="livemax",
)
verdicts = Counter("fraudd_console_verdicts_total", "Verdicts given, by analyst and verdict.", ["analyst", "verdict"])
time_to_verdict = Histogram(
    "fraudd_console_time_to_verdict_seconds",
    "From a case's creation to its verdict, by analyst.",
    ["analyst"],
    buckets=VERDICT_BUCKETS,
)
cases_created = Counter("fraudd_console_cases_created_total", "Cases created from new review and decline decisions.")


def set_depth(tallies: dict[str, dict], oldest_s: dict[str, float], slas: dict[str, timedelta]) -> None:
    """Each queue's depth, its oldest open case and its SLA, from one housekeeping pass: the SLA
    alert compares the last two per queue."""
    for decision in DECISIONS:
        for state in STATES[:2]:
            queue_depth.labels(decision, state).set(tallies[decision][state])
        oldest_open_age.labels(decision).set(oldest_s[decision])
        sla_seconds.labels(decision).set(slas[decision].total_seconds())
