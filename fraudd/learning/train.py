"""Training a model on labelled history with the daemon's own feature code (``fraudd train``).

The history and its features come from ``history.py``. The split is by time: the most recent part
is held out for the model card's figures, the part before it sets the thresholds, the rest fits
the trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import onnx
import onnxmltools
import orjson
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.metrics import average_precision_score

from fraudd.scoring import model as model_meta
from fraudd.scoring.bins import FeatureBins
from fraudd.scoring.features import FEATURE_NAMES, MESSAGE_FEATURES

from .history import Dataset, Progress, quiet
from .report import recall_at_fpr

REVIEW_FPR = 0.01
DECLINE_FPR = 0.001
LIGHTGBM_PARAMS: dict[str, Any] = dict(
    objective="binary",
    n_estimators=120,
    num_leaves=15,
    learning_rate=0.08,
    min_child_samples=40,
    subsample=0.8,
    subsample_freq=1,
    colsample_bytree=0.9,
    reg_lambda=1.0,
    verbose=-1,
    n_jobs=2,
)


def threshold_at_fpr(scores: np.ndarray, is_fraud: np.ndarray, fpr: float) -> float:
    """The lowest score threshold whose false-positive rate on legit rows is at most ``fpr``."""
    legit = np.sort(scores[~is_fraud])
    return float(legit[min(len(legit) - 1, int(np.ceil(len(legit) * (1.0 - fpr))))])


# Plain rules a team could write without a model: the baselines a trained model must beat.
PLAIN_RULES: dict[str, str] = {
    "amount": "amount over a threshold",
    "count_1h": "velocity: transactions by the user within an hour",
    "count_24h": "velocity: transactions by the user within 24 hours",
    "card_count_1h": "velocity: transactions on the card within an hour",
}


def plain_rule_scores(data: Dataset) -> dict[str, np.ndarray]:
    """Each plain rule's column (the rule is ``column > threshold``)."""
    columns = {name: data.matrix[:, FEATURE_NAMES.index(name)] for name in PLAIN_RULES if name in FEATURE_NAMES}
    columns["amount"] = np.expm1(data.matrix[:, FEATURE_NAMES.index("log_amount")])
    return columns


def evaluate(scores: np.ndarray, data: Dataset, review: float, decline: float) -> dict:
    fraud = data.is_fraud
    legit = ~fraud
    at_1pct = threshold_at_fpr(scores, fraud, 0.01)
    result: dict[str, Any] = {
        "transactions": int(len(fraud)),
        "fraud": int(fraud.sum()),
        "pr_auc": round(float(average_precision_score(fraud, scores)), 4),
        "recall_at_review": round(float((scores[fraud] >= review).mean()), 4),
        "fpr_at_review": round(float((scores[legit] >= review).mean()), 5),
        "recall_at_decline": round(float((scores[fraud] >= decline).mean()), 4),
        "fpr_at_decline": round(float((scores[legit] >= decline).mean()), 5),
        "recall_at_1pct_fpr": round(float((scores[fraud] >= at_1pct).mean()), 4),
        "recall_at_0.1pct_fpr": round(float((scores[fraud] >= threshold_at_fpr(scores, fraud, 0.001)).mean()), 4),
        "typology_recall_at_1pct_fpr": {},
        "typology_recall_at_review": {},
    }
    for code, name in enumerate(data.names):
        rows = data.typology == code
        if code and rows.any():
            result["typology_recall_at_1pct_fpr"][name] = round(float((scores[rows] >= at_1pct).mean()), 4)
            result["typology_recall_at_review"][name] = round(float((scores[rows] >= review).mean()), 4)
    return result


def plain_rule_recalls(data: Dataset, fpr: float) -> dict[str, float]:
    """Each plain rule's recall at false-positive rate ``fpr`` on ``data``."""
    return {name: round(recall_at_fpr(column, data.is_fraud, fpr), 4) for name, column in plain_rule_scores(data).items()}


def fit(train: Dataset, columns: list[int], seed: int) -> lightgbm.LGBMClassifier:
    classifier = lightgbm.LGBMClassifier(random_state=seed, **LIGHTGBM_PARAMS)
    classifier.fit(train.matrix[:, columns], train.is_fraud.astype(np.int64))
    return classifier


def fraud_probability(classifier: lightgbm.LGBMClassifier, matrix: np.ndarray) -> np.ndarray:
    """The classifier's probability of the fraud class for each row."""
    return np.asarray(classifier.predict_proba(matrix))[:, 1]


@dataclass
class Trained:
    """A fitted model with its thresholds and held-out figures, ready to export."""

    classifier: lightgbm.LGBMClassifier
    version: str
    review: float
    decline: float
    metrics: dict
    baseline: dict  # the single-message model's figures
    plain_rules: dict[str, float]  # recall at 1% FPR of each plain rule on the held-out part
    fit_part: Dataset


def train(
    fit_part: Dataset,
    tune: Dataset,
    holdout: Dataset,
    seed: int,
    version: str,
    review_fpr: float = REVIEW_FPR,
    decline_fpr: float = DECLINE_FPR,
    progress: Progress = quiet,
) -> Trained:
    """Fit on ``fit_part``, set thresholds on ``tune``, measure on ``holdout``."""
    all_columns = list(range(len(fit_part.feature_names)))
    progress(f"fitting on {len(fit_part):,} transactions ({int(fit_part.is_fraud.sum()):,} fraud)")
    classifier = fit(fit_part, all_columns, seed)
    tune_scores = fraud_probability(classifier, tune.matrix)
    review = threshold_at_fpr(tune_scores, tune.is_fraud, review_fpr)
    decline = threshold_at_fpr(tune_scores, tune.is_fraud, decline_fpr)
    metrics = evaluate(fraud_probability(classifier, holdout.matrix), holdout, review, decline)

    progress("fitting the single-message baseline")
    message_columns = [FEATURE_NAMES.index(name) for name in MESSAGE_FEATURES]
    baseline = fit(fit_part, message_columns, seed)
    baseline_tune_scores = fraud_probability(baseline, tune.matrix[:, message_columns])
    baseline_metrics = evaluate(
        fraud_probability(baseline, holdout.matrix[:, message_columns]),
        holdout,
        threshold_at_fpr(baseline_tune_scores, tune.is_fraud, review_fpr),
        threshold_at_fpr(baseline_tune_scores, tune.is_fraud, decline_fpr),
    )
    return Trained(classifier, version, review, decline, metrics, baseline_metrics, plain_rule_recalls(holdout, 0.01), fit_part)


def export(trained: Trained, path: Path) -> None:
    classifier, fit_part = trained.classifier, trained.fit_part
    onnx_model = onnxmltools.convert_lightgbm(
        classifier,
        initial_types=[("features", FloatTensorType([None, len(fit_part.feature_names)]))],
        zipmap=False,
        target_opset=15,
    )
    _write_covers(onnx_model, classifier.booster_)
    gain = classifier.booster_.feature_importance(importance_type="gain")
    figures = {
        "holdout": trained.metrics,
        "message_only_baseline": trained.baseline,
        "plain_rules_recall_at_1pct_fpr": trained.plain_rules,
    }
    meta = {
        model_meta.META_VERSION: trained.version,
        model_meta.META_FEATURES: orjson.dumps(list(fit_part.feature_names)).decode(),
        model_meta.META_REVIEW: repr(trained.review),
        model_meta.META_DECLINE: repr(trained.decline),
        model_meta.META_MEANS: orjson.dumps(fit_part.matrix.mean(axis=0).tolist()).decode(),
        model_meta.META_SCALES: orjson.dumps((fit_part.matrix.std(axis=0) + 1e-6).tolist()).decode(),
        model_meta.META_IMPORTANCE: orjson.dumps((gain / gain.sum()).tolist()).decode(),
        model_meta.META_METRICS: orjson.dumps(figures).decode(),
        model_meta.META_BINS: FeatureBins.of(fit_part.matrix).dumps(),
        # The model as LightGBM itself wrote it: what an auditor compares the ONNX file against, and
        # how the explanations are checked against LightGBM's own contributions.
        model_meta.META_SOURCE: classifier.booster_.model_to_string(),
    }
    onnx.helper.set_model_props(onnx_model, meta)
    onnx_model.producer_name = "fraudd train"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())


def _write_covers(onnx_model: onnx.ModelProto, booster: lightgbm.Booster) -> None:
    """Each node's training-row count into the ensemble's ``nodes_hitrates``, for exact explanations.

    The converter leaves them at 1; the explainer (``fraudd.scoring.explain``) needs them, and the
    daemon must not depend on LightGBM to read them. The two trees are walked side by side, checking
    that every split agrees, so a converter that laid nodes out differently fails here, not later.
    """
    (ensemble,) = [node for node in onnx_model.graph.node if node.op_type == "TreeEnsembleClassifier"]
    attributes = {a.name: a for a in ensemble.attribute}
    values = {name: onnx.helper.get_attribute_value(attribute) for name, attribute in attributes.items()}
    index = {(tree, node): i for i, (tree, node) in enumerate(zip(values["nodes_treeids"], values["nodes_nodeids"]))}
    covers = [0.0] * len(index)
    for tree, info in enumerate(booster.dump_model()["tree_info"]):
        stack = [(info["tree_structure"], index[(tree, 0)])]
        while stack:
            lgb_node, i = stack.pop()
            if "leaf_index" in lgb_node or "split_index" not in lgb_node:
                covers[i] = float(lgb_node.get("leaf_count", 0))
                continue
            if values["nodes_featureids"][i] != lgb_node["split_feature"] or lgb_node["decision_type"] != "<=":
                raise RuntimeError(f"tree {tree}: the ONNX ensemble's splits do not match LightGBM's")
            covers[i] = float(lgb_node["internal_count"])
            stack.append((lgb_node["left_child"], index[(tree, values["nodes_truenodeids"][i])]))
            stack.append((lgb_node["right_child"], index[(tree, values["nodes_falsenodeids"][i])]))
    hitrates = attributes.get("nodes_hitrates")
    if hitrates is None:
        ensemble.attribute.append(onnx.helper.make_attribute("nodes_hitrates", covers))
    else:
        del hitrates.floats[:]
        hitrates.floats.extend(covers)


def model_card(trained: Trained, data_section: str, command: str) -> str:
    metrics, baseline, review, decline = trained.metrics, trained.baseline, trained.review, trained.decline
    gain = trained.classifier.booster_.feature_importance(importance_type="gain")
    top = sorted(zip(trained.fit_part.feature_names, gain / gain.sum()), key=lambda item: -item[1])[:8]
    typologies = "\n".join(
        f"| {name} | {recall:.1%} | {metrics['typology_recall_at_review'][name]:.1%} | "
        f"{baseline['typology_recall_at_1pct_fpr'][name]:.1%} |"
        for name, recall in metrics["typology_recall_at_1pct_fpr"].items()
    )
    rules = "\n".join(f"| {PLAIN_RULES[name]} | {recall:.1%} |" for name, recall in trained.plain_rules.items())
    importance = "\n".join(f"| {name} | {share:.1%} |" for name, share in top)
    return f"""# Model card: `{trained.version}`

Produced by `{command}` (re-running it reproduces these figures). LightGBM,
{LIGHTGBM_PARAMS["n_estimators"]} trees × {LIGHTGBM_PARAMS["num_leaves"]} leaves, exported to ONNX with
its feature contract ({len(trained.fit_part.feature_names)} features, in the daemon's order) and thresholds in the
metadata.

## Data
{data_section}
Features come from the daemon's own feature store, so offline and live features are the same
computation.

## Held-out results
| metric | this model | single-message baseline |
|---|---|---|
| PR-AUC | {metrics["pr_auc"]:.4f} | {baseline["pr_auc"]:.4f} |
| recall at 1% FPR | {metrics["recall_at_1pct_fpr"]:.1%} | {baseline["recall_at_1pct_fpr"]:.1%} |
| recall at 0.1% FPR | {metrics["recall_at_0.1pct_fpr"]:.1%} | {baseline["recall_at_0.1pct_fpr"]:.1%} |

The baseline is the same learner trained on the single-message features alone
({", ".join(MESSAGE_FEATURES)}): the gap shows how much of the fraud lives in behaviour.

Plain rules on the same held-out transactions, each at its best threshold within 1% FPR:

| rule | recall at 1% FPR |
|---|---|
{rules}

## Thresholds (set on the tuning slice)
- review from score {review:.4f} (1% FPR on tuning data): held-out recall {metrics["recall_at_review"]:.1%}
  at FPR {metrics["fpr_at_review"]:.2%};
- decline from score {decline:.4f} (0.1% FPR): held-out recall {metrics["recall_at_decline"]:.1%}
  at FPR {metrics["fpr_at_decline"]:.3%}.

## Recall per typology (held out)
| typology | at 1% FPR | at the review threshold | single-message baseline at 1% FPR |
|---|---|---|---|
{typologies}

## Most important features (share of gain)
| feature | share |
|---|---|
{importance}

## Limits
The figures hold for the data above. Retrain on the team's own labelled history (`fraudd train
--from-postgres`) as labels accumulate, and run a new model in shadow before it decides.
"""
