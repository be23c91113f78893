"""Retraining that cannot make things worse (``fraudd retrain``); changing the champion by hand is ``champion.py``.

A retrain reads the last days of the team's own stored, labelled traffic (``fraudd train
--from-postgres``'s path: ``store.py``, then the daemon's own features) and holds out its most
recent window. A candidate is trained on what precedes the window; on the window, which neither
model was trained on, the candidate is calibrated to the champion's budget (the review and decline
rates the champion gives there, rules included: ``calibrate.py``) and both are compared at that
budget (``report.figures``). The candidate is promoted only when its recall beats the champion's
by the margin; otherwise the champion keeps deciding, the candidate runs as its shadow, and the
audit row says why. Either way the comparison goes to ``model_promotions`` and the candidate's
model card, and the workers follow within a second (``fraudd.scoring.deployment``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis

from fraudd.schema import connect
from fraudd.scoring import deployment
from fraudd.scoring.deployment import DeploymentError, Registered
from fraudd.scoring.model import FraudModel
from fraudd.scoring.rules import DECLINE, REVIEW, Rules

from . import history
from . import train as training
from .calibrate import CalibrationError, calibrate, decisions, scores_under_rules
from .champion import load_deployable
from .report import ModelFigures, figures, format_report
from .store import stored_history

MIN_WINDOW_FRAUD = 10  # fewer labelled frauds in the window and recall differences are noise


@dataclass(frozen=True, slots=True)
class Outcome:
    champion: Registered
    candidate: Registered
    promoted: bool
    reason: str
    comparison: dict
    card: Path


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def retrain(
    client: redis.Redis,
    postgres_url: str,
    pg_schema: str,
    flags_champion: Registered,
    rules: Rules,
    since_s: float,
    window_s: float,
    margin: float,
    label_delay_s: float | None,
    models_dir: Path,
    seed: int,
    actor: str,
    command: str,
    progress: history.Progress,
) -> Outcome:
    """Train, compare on the held-out window, promote or keep, record; see the module's docstring."""
    with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
        deployed = deployment.current(conn)
    champion = deployed.champion if deployed is not None else flags_champion
    stored = stored_history(postgres_url, pg_schema, since_s)
    data = history.featurize(client, stored.history, progress, label_delay_s)
    cut = int(np.searchsorted(data.timestamp, data.timestamp[-1] - window_s, side="left"))
    past, window = data.take(slice(0, cut)), data.take(slice(cut, len(data)))
    parts = history.split_bounds(len(past), 0.2, 0.2)
    history.check_positives(past.is_fraud, parts)
    version = (
        f"lgbm-{training.LIGHTGBM_PARAMS['n_estimators']}x{training.LIGHTGBM_PARAMS['num_leaves']}-"
        f"{history.data_version(stored.history)}"
    )
    fit_part, tune, holdout = (past.take(rows) for rows in parts)
    trained = training.train(fit_part, tune, holdout, seed, version, progress=progress)
    path = models_dir / f"{version}.onnx"
    training.export(trained, path)

    scored = {
        name: scores_under_rules(model.score(_inputs(model, window)).astype(np.float64), stored.reasons[cut:], rules)
        for name, model in (("champion", load_deployable(champion.path)), ("candidate", load_deployable(path)))
    }
    champion_decision = decisions(scored["champion"], champion.review_threshold, champion.decline_threshold)
    budget = {
        "review_rate": round(float((champion_decision == REVIEW).mean()), 6) if len(window) else 0.0,
        "decline_rate": round(float((champion_decision == DECLINE).mean()), 6) if len(window) else 0.0,
    }
    period = f"{_stamp(window.timestamp[0])} to {_stamp(window.timestamp[-1])}" if len(window) else "an empty window"
    comparison: dict = {
        "trained_on": _span(past),
        "window": _span(window),
        "budget": budget,
        "margin": margin,
    }
    try:
        chosen = calibrate(scored["candidate"], budget["review_rate"], budget["decline_rate"], version, period, rules.version)
    except CalibrationError as exc:
        candidate = Registered(version, path, trained.review, trained.decline, {})
        promoted, reason = False, f"the window cannot calibrate the candidate: {exc}"
    else:
        candidate = Registered(version, path, chosen.review_threshold, chosen.decline_threshold, chosen.calibration)
        candidate_decision = decisions(scored["candidate"], candidate.review_threshold, candidate.decline_threshold)
        results = (
            figures(champion.version, scored["champion"].score, champion_decision > 0, window.is_fraud),
            figures(version, scored["candidate"].score, candidate_decision > 0, window.is_fraud),
        )
        comparison["champion"], comparison["candidate"] = (asdict(result) for result in results)
        promoted, reason = _verdict(*results, margin)
        comparison["report"] = format_report(*results, period)

    card = path.with_suffix(".md")
    card.write_text(
        training.model_card(trained, _data_section(stored.history.source, past, window), command)
        + _decision_section(champion, candidate, promoted, reason, comparison)
    )
    with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
        for model in (champion, candidate):
            if deployment.registered(conn, model.version) is None or model is candidate:
                deployment.register(conn, model)
        if promoted:
            deployment.deploy(conn, version, None, "retrain-promoted", actor, reason, comparison, replacing=champion.version)
        else:
            deployment.deploy(
                conn, champion.version, version, "retrain-kept", actor, reason, comparison, version, champion.version
            )
    return Outcome(champion, candidate, promoted, reason, comparison, card)


def _inputs(model: FraudModel, data: history.Dataset) -> np.ndarray:
    """``data``'s columns of ``model``'s feature contract (the label-fed counts follow the others)."""
    width = len(model.feature_names)
    if data.feature_names[:width] != model.feature_names:
        raise DeploymentError(
            f"model {model.version} takes the label-fed features, computed only with --label-features: retrain with it"
        )
    return data.matrix[:, :width]


def _span(part: history.Dataset) -> dict:
    if len(part) == 0:
        return {"transactions": 0, "fraud": 0}
    return {
        "from": _stamp(part.timestamp[0]),
        "to": _stamp(part.timestamp[-1]),
        "transactions": len(part),
        "fraud": int(part.is_fraud.sum()),
    }


def _verdict(champion: ModelFigures, candidate: ModelFigures, margin: float) -> tuple[bool, str]:
    """(promote, why): the candidate must catch ``margin`` more of the window's fraud at the same budget."""
    at = f"at the champion's alert budget ({champion.alert_rate:.2%} of the window)"
    if champion.fraud < MIN_WINDOW_FRAUD:
        return False, f"only {champion.fraud} labelled fraud in the window (at least {MIN_WINDOW_FRAUD} are needed to compare)"
    if candidate.recall >= champion.recall + margin:
        return True, (f"recall {candidate.recall:.1%} {at} beats the champion's {champion.recall:.1%} by at least {margin:.1%}")
    return False, (f"recall {candidate.recall:.1%} {at} does not beat the champion's {champion.recall:.1%} by {margin:.1%}")


def _data_section(source: str, past: history.Dataset, window: history.Dataset) -> str:
    return (
        f"{source}: the {len(past):,} labelled transactions ({int(past.is_fraud.sum()):,} fraud) before the most\n"
        f"recent window, in time order (first 60% fit, next 20% set the model's own thresholds, last 20% held\n"
        f"out for the figures below). The window's {len(window):,} transactions ({int(window.is_fraud.sum()):,} fraud)\n"
        f"were not trained on: they decide the promotion (last section)."
    )


def _decision_section(champion: Registered, candidate: Registered, promoted: bool, reason: str, comparison: dict) -> str:
    budget = comparison["budget"]
    report = comparison.get("report", "(no comparison)")
    verdict = (
        "promoted: it decides now"
        if promoted
        else f"not promoted: `{champion.version}` keeps deciding, this model runs in shadow"
    )
    return f"""
## Promotion decision
Against the champion `{champion.version}` on the most recent window (not trained on), this model
calibrated to the champion's budget there (review {budget["review_rate"]:.2%}, decline {budget["decline_rate"]:.2%}):
review from {candidate.review_threshold:.6g}, decline from {candidate.decline_threshold:.6g}.

```
{report}
```

Decision: {verdict}; {reason}.
"""
