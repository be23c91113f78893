"""Thresholds from a team's alert budget and its own recent scores (``fraudd calibrate``).

No labels are needed: a team knows how many transactions its analysts can review and how many it
is willing to decline. Given the share of traffic for each, the thresholds are the score
quantiles of the team's stored traffic, after what the rules already force: a rule that reviews
or declines a transaction spends the same budget as the model does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fraudd.schema import connect
from fraudd.scoring.rules import DECISIONS, DECLINE, REVIEW, Rules
from fraudd.scoring.thresholds import Thresholds


class CalibrationError(RuntimeError):
    """The stored traffic cannot give thresholds; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class StoredScores:
    score: np.ndarray  # float64 (n,)
    forced: np.ndarray  # int8 (n,): the strongest action the current rules force on the row
    rule_shares: dict[str, float]  # share of the rows each rule of the current file fired on


def stored_scores(postgres_url: str, pg_schema: str, model_version: str, since_s: float, rules: Rules) -> StoredScores:
    """The scores ``model_version`` gave the transactions of the last ``since_s`` seconds (event time)."""
    with connect(postgres_url, pg_schema, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT score, reasons FROM transactions WHERE event_time >= now() - make_interval(secs => %s) "
            "AND model_version = %s",
            (since_s, model_version),
        ).fetchall()
    return scores_under_rules(np.fromiter((row[0] for row in rows), np.float64, len(rows)), [row[1] for row in rows], rules)


def scores_under_rules(score: np.ndarray, reasons: list[list[str]], rules: Rules) -> StoredScores:
    """``score`` with what the current rules force on each row, from the rule codes in its stored reasons."""
    actions = {rule.code: rule.action for rule in rules.rules}
    forced = np.fromiter((max((actions.get(code, 0) for code in codes), default=0) for codes in reasons), np.int8, len(reasons))
    fired = Counter(code for codes in reasons for code in codes if code in actions)
    return StoredScores(score, np.maximum(forced, 0), {code: count / max(len(reasons), 1) for code, count in fired.most_common()})


def _threshold(scores: np.ndarray, forced: np.ndarray, level: int, target: float) -> tuple[float, float]:
    """The lowest threshold such that rows at ``level`` or above (forced, or by score) are at most
    ``target`` of all rows; with the rate it gives on these rows."""
    n = len(scores)
    already = forced >= level
    budget = int(np.floor(target * n)) - int(already.sum())
    free = np.sort(scores[~already])[::-1]
    if budget <= 0 or len(free) == 0:
        threshold = 1.0
    elif budget >= len(free):
        threshold = float(free[-1])
    else:
        # Strictly above the (budget+1)-th highest score: ties never push the rate over the target.
        threshold = float(np.nextafter(np.float32(free[budget]), np.float32(np.inf)))
    rate = float((already | (scores >= threshold)).mean())
    return min(threshold, 1.0), rate


def decisions(stored: StoredScores, review: float, decline: float) -> np.ndarray:
    """The decision codes (``DECISIONS``) of ``stored``'s rows at these thresholds, rules included."""
    return np.maximum(np.where(stored.score >= decline, DECLINE, np.where(stored.score >= review, REVIEW, 0)), stored.forced)


def calibrate(
    stored: StoredScores, review_rate: float, decline_rate: float, model_version: str, since: str, rules_version: str
) -> Thresholds:
    """Thresholds that put ``review_rate`` of the traffic in review and ``decline_rate`` in decline."""
    n = len(stored.score)
    if n == 0:
        raise CalibrationError(
            f"no stored transactions scored by model {model_version} in the last {since}: "
            f"run it (in shadow, or with --review-threshold 1) on the team's traffic first"
        )
    if n < 1000:
        raise CalibrationError(
            f"only {n} transactions scored by model {model_version} in the last {since}; "
            f"at least 1000 are needed for rates of a percent"
        )
    decline, decline_share = _threshold(stored.score, stored.forced, DECLINE, decline_rate)
    review, flagged_share = _threshold(stored.score, stored.forced, REVIEW, review_rate + decline_rate)
    review = min(review, decline)
    decision = decisions(stored, review, decline)
    shares = np.bincount(decision, minlength=len(DECISIONS)) / n
    forced_shares = np.bincount(stored.forced, minlength=len(DECISIONS)) / n
    return Thresholds(
        review_threshold=review,
        decline_threshold=decline,
        model_version=model_version,
        calibration={
            "since": since,
            "transactions": n,
            "target_review_rate": review_rate,
            "target_decline_rate": decline_rate,
            "expected_review_rate": round(float(shares[REVIEW]), 6),
            "expected_decline_rate": round(float(shares[DECLINE]), 6),
            "forced_by_rules": {
                "review": round(float(forced_shares[REVIEW]), 6),
                "decline": round(float(forced_shares[DECLINE]), 6),
            },
            "rules_version": rules_version,
            "rules_fired": {code: round(share, 6) for code, share in stored.rule_shares.items()},
        },
    )
