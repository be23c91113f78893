"""Champion against challenger on the labelled rows (``fraudd models report``).

Both scored every transaction of the period (the challenger with ``fraudd run --shadow-model``),
so they are compared on the same traffic: recall and precision at the thresholds each decided
with, alert volume, and recall at 0.1% and 1% false-positive rate. A transaction without a label
counts as legitimate, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fraudd.schema import connect


def recall_at_fpr(scores: np.ndarray, is_fraud: np.ndarray, fpr: float) -> float:
    """Recall of the best rule ``score > t`` whose false-positive rate is at most ``fpr``.

    Exact with ties, so a plain rule with few distinct values (a count, a round amount) is judged
    at the false-positive rate it really has, never above the budget.
    """
    legit = np.sort(scores[~is_fraud])
    allowed = int(np.floor(len(legit) * fpr))
    bar = legit[len(legit) - allowed - 1] if allowed < len(legit) else -np.inf
    return float((scores[is_fraud] > bar).mean()) if is_fraud.any() else 0.0


@dataclass(frozen=True, slots=True)
class ModelFigures:
    model_version: str
    transactions: int
    fraud: int
    alerts: int  # reviewed or declined
    recall: float  # of labelled fraud, reviewed or declined
    precision: float  # of alerts, labelled fraud
    recall_at_1pct_fpr: float
    recall_at_01pct_fpr: float

    @property
    def alert_rate(self) -> float:
        return self.alerts / max(self.transactions, 1)


def figures(version: str, score: np.ndarray, flagged: np.ndarray, fraud: np.ndarray) -> ModelFigures:
    alerts = int(flagged.sum())
    caught = int((flagged & fraud).sum())
    return ModelFigures(
        version,
        len(score),
        int(fraud.sum()),
        alerts,
        caught / max(int(fraud.sum()), 1),
        caught / max(alerts, 1),
        recall_at_fpr(score, fraud, 0.01),
        recall_at_fpr(score, fraud, 0.001),
    )


def compare(postgres_url: str, pg_schema: str, since_s: float) -> tuple[ModelFigures, ModelFigures] | None:
    """(champion, challenger) over the transactions of the last ``since_s`` seconds (event time)
    that both scored; None when no challenger scored any."""
    with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT t.model_version, t.score, t.decision <> 'approve', t.shadow_model_version, t.shadow_score,
                      t.shadow_decision <> 'approve', coalesce(l.label = 'fraud', false)
               FROM transactions t LEFT JOIN labels l USING (transaction_id)
               WHERE t.event_time >= now() - make_interval(secs => %s) AND t.shadow_score IS NOT NULL""",
            (since_s,),
        ).fetchall()
    if not rows:
        return None
    columns = list(zip(*rows))
    fraud = np.array(columns[6], dtype=bool)

    def version(values: tuple) -> str:
        return ", ".join(sorted(set(values)))

    return (
        figures(version(columns[0]), np.array(columns[1], np.float64), np.array(columns[2], bool), fraud),
        figures(version(columns[3]), np.array(columns[4], np.float64), np.array(columns[5], bool), fraud),
    )


def format_report(champion: ModelFigures, challenger: ModelFigures, since: str) -> str:
    lines = [
        f"{champion.transactions:,} transactions of the last {since} scored by both, {champion.fraud:,} labelled fraud",
        f"{'':24}{'champion':>22}{'challenger':>22}",
        f"{'model':24}{champion.model_version:>22}{challenger.model_version:>22}",
    ]
    for name, attribute, form in (
        ("alerts", "alerts", "{:,}"),
        ("alert rate", "alert_rate", "{:.2%}"),
        ("recall at thresholds", "recall", "{:.1%}"),
        ("precision at thresholds", "precision", "{:.1%}"),
        ("recall at 1% FPR", "recall_at_1pct_fpr", "{:.1%}"),
        ("recall at 0.1% FPR", "recall_at_01pct_fpr", "{:.1%}"),
    ):
        lines.append(f"{name:24}{form.format(getattr(champion, attribute)):>22}{form.format(getattr(challenger, attribute)):>22}")
    return "\n".join(lines)
