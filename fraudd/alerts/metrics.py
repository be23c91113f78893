"""Metrics of ``fraudd alerts`` beyond the delivery counter the dashboard already reads
(``fraudd_alert_deliveries_total`` in ``fraudd.runtime.metrics``)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

from ..runtime.metrics import LATENCY_BUCKETS

delivery_latency = Histogram(
    "fraudd_alert_delivery_latency_seconds",
    "Delivery time minus the time Redis accepted the alert on the fraud stream (its entry id), per delivered alert.",
    ["channel"], buckets=LATENCY_BUCKETS + (60.0, 300.0, 1800.0),
)
backlog = Gauge("fraudd_alert_backlog", "Deliveries recorded in alert_deliveries and not yet made (due or waiting to retry).",
                multiprocess_mode="livemax")
