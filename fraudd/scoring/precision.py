"""The share of flagged decisions later labelled fraud, by week: the precision the analysts see.

Labels (chargebacks, verdicts) arrive days to weeks after a decision, so this cannot be counted
when a transaction is scored: the scoring supervisor's housekeeping asks PostgreSQL every
``INTERVAL_S`` for the reviewed or declined transactions of the last ``WEEKS`` ISO weeks (event
time; the partial index ``transactions_flagged`` holds only those rows) and how many of them are
labelled fraud by now, and publishes both per week. A flagged transaction without a label counts
as not fraud, as in training and ``fraudd models report``; a week's share rises as its labels come in.
"""

from __future__ import annotations

import logging
import time

import psycopg

from ..runtime import metrics
from ..schema import connect

log = logging.getLogger(__name__)

INTERVAL_S = 600.0
WEEKS = 8


class FlaggedPrecision:
    def __init__(self, postgres_url: str, pg_schema: str) -> None:
        self._url, self._schema = postgres_url, pg_schema
        self._next = 0.0
        self._failing = False

    def run_once(self) -> None:
        """Refresh the gauges when due; PostgreSQL being away only delays them (logged once)."""
        now = time.monotonic()
        if now < self._next:
            return
        try:
            with connect(
                self._url, self._schema, connect_timeout=3, autocommit=True, application_name="fraudd-supervisor"
            ) as conn:
                weeks = conn.execute(
                    """SELECT to_char(date_trunc('week', t.event_time), 'YYYY-MM-DD'), count(*),
                              count(l.transaction_id), count(*) FILTER (WHERE l.label = 'fraud')
                       FROM transactions t LEFT JOIN labels l USING (transaction_id)
                       WHERE t.decision <> 'approve' AND t.event_time >= date_trunc('week', now()) - make_interval(weeks => %s)
                       GROUP BY 1""",
                    (WEEKS - 1,),
                ).fetchall()
        except psycopg.Error as exc:
            if not self._failing:
                log.warning("cannot count labelled decisions", extra={"event": "precision_unavailable", "error": str(exc)})
            self._failing = True
            self._next = now + INTERVAL_S / 10
            return
        self._failing = False
        self._next = now + INTERVAL_S
        for week, flagged, labelled, fraud in weeks:
            metrics.flagged_fraud_share.labels(week).set(fraud / flagged)
            metrics.flagged_labelled.labels(week).set(labelled)
