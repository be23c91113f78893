"""The share of flagged decisions later labelled fraud, by week, and each rule's precision: the
precision the analysts see.

Labels (chargebacks, verdicts) arrive days to weeks after a decision, so this cannot be counted
when a transaction is scored: the scoring supervisor's housekeeping asks PostgreSQL every
``INTERVAL_S`` for the reviewed or declined transactions of the last ``WEEKS`` ISO weeks (event
time; the partial index ``transactions_flagged`` holds only those rows) and how many of them are
labelled fraud by now, and publishes both per week. A flagged transaction without a label counts
as not fraud, as in training and ``fraudd models report``; a week's share rises as its labels come in.

Per rule, the same window is read from the labelled side: each labelled transaction's stored
``reasons`` (the codes of the rules that fired, beside the model's ``model:<feature>`` reasons) give
every rule its labelled hits and how many of them are fraud, so a rule's precision counts only the
hits that have a verdict, as ``fraudd rules test`` reports it. The latest label of a transaction
(``labels``, what ``label_history`` settled on) counts, once.
"""

from __future__ import annotations

import logging
import time

import psycopg

from ..runtime import metrics
from ..schema import connect
from .rules import CODE_PATTERN

log = logging.getLogger(__name__)

INTERVAL_S = 600.0
WEEKS = 8
# These run in the supervisor's loop, which also pings systemd's watchdog (60 s): a query is cut off
# past this, logged, and tried again later, rather than hold the supervisor. The per-rule count reads
# every labelled transaction of the window (220 ms for a window of 300,000 rows on a loaded 2-core box).
QUERY_TIMEOUT_S = 10


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
                conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{QUERY_TIMEOUT_S}s",))
                weeks = conn.execute(
                    """SELECT to_char(date_trunc('week', t.event_time), 'YYYY-MM-DD'), count(*),
                              count(l.transaction_id), count(*) FILTER (WHERE l.label = 'fraud')
                       FROM transactions t LEFT JOIN labels l USING (transaction_id)
                       WHERE t.decision <> 'approve' AND t.event_time >= date_trunc('week', now()) - make_interval(weeks => %s)
                       GROUP BY 1""",
                    (WEEKS - 1,),
                ).fetchall()
                for week, flagged, labelled, fraud in weeks:
                    metrics.flagged_fraud_share.labels(week).set(fraud / flagged)
                    metrics.flagged_labelled.labels(week).set(labelled)
                # A label is reported after its transaction: labels reported before the window
                # (``labels_reported``) cannot be of its transactions, and are not joined.
                rules = conn.execute(
                    """SELECT r.code, count(*), count(*) FILTER (WHERE l.label = 'fraud')
                       FROM labels l JOIN transactions t USING (transaction_id) CROSS JOIN unnest(t.reasons) AS r(code)
                       WHERE t.event_time >= date_trunc('week', now()) - make_interval(weeks => %s)
                         AND l.reported_at >= date_trunc('week', now()) - make_interval(weeks => %s) AND r.code ~ %s
                       GROUP BY 1""",
                    (WEEKS - 1, WEEKS - 1, CODE_PATTERN),
                ).fetchall()
        except psycopg.Error as exc:
            if not self._failing:
                log.warning("cannot count labelled decisions", extra={"event": "precision_unavailable", "error": str(exc)})
            self._failing = True
            self._next = now + INTERVAL_S / 10
            return
        self._failing = False
        self._next = now + INTERVAL_S
        for code, labelled, fraud in rules:
            metrics.rule_precision.labels(code).set(fraud / labelled)
            metrics.rule_labelled_hits.labels(code).set(labelled)
