"""Explanations are exact: LightGBM's own contributions, adding up to the score, stored with each flag."""

from __future__ import annotations

import time
from pathlib import Path

import lightgbm
import numpy as np
import onnx
import orjson
import pytest
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.learning.history import Dataset, dataset, featurize, read_history
from fraudd.learning.simulator import Simulator, SimulatorConfig
from fraudd.scoring.explain import EXPLAIN_BLOCK_ROWS, TreeExplainer, _Leaf, _leaf_table
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.model import META_SOURCE, FraudModel
from fraudd.scoring.settings import DEFAULT_MODEL

from .conftest import Namespace
from .services import drain


@pytest.fixture(scope="module")
def holdout() -> Dataset:
    return dataset(redis.Redis(protocol=2), seed=2, n=20_000)


def logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p / (1 - p))


def contributions_of(explanations: list[dict | None], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(base per row, contributions rows × features) from explanation documents."""
    base = np.array([e["base"] for e in explanations])
    return base, np.array([[e["contributions"][name] for name in names] for e in explanations])


def assert_exact(model_path: Path, rows: np.ndarray) -> None:
    """The model's explanations of ``rows`` equal LightGBM's ``pred_contrib`` and add up to the score."""
    model = FraudModel.load(model_path, FEATURE_NAMES)
    assert model.explainable
    meta = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    booster = lightgbm.Booster(model_str=meta[META_SOURCE])
    reference = booster.predict(rows, pred_contrib=True)
    raw = booster.predict(rows, raw_score=True)

    reasons, explanations = model.explain(rows)
    names = model.feature_names
    base, contributions = contributions_of(explanations, names)
    assert np.abs(base - reference[:, -1]).max() < 1e-5
    assert np.abs(contributions - reference[:, :-1]).max() < 1e-5
    assert np.abs(base + contributions.sum(axis=1) - raw).max() < 1e-4
    # Against the score as served (float32 probability): exact wherever float32 can still tell
    # log-odds apart to 1e-4.
    scores = model.score(rows)
    servable = (scores > 1e-4) & (scores < 0.999)
    assert servable.sum() > len(rows) // 4
    assert np.abs((base + contributions.sum(axis=1) - logit(scores))[servable]).max() < 1e-4
    # Reasons name what pushed the score up, strongest first; never a feature that pulled it down.
    for codes, row in zip(reasons, contributions):
        expected = [names[j] for j in np.argsort(-row)[:2] if row[j] > 0]
        assert [code.removeprefix("model:") for code in codes] == expected
    # The values the row was scored with, as stored (JSON has no NaN: a missing value is null).
    stored = orjson.loads(orjson.dumps([explanation["values"] for explanation in explanations]))
    expected = [{name: None if np.isnan(v) else v for name, v in zip(names, values)} for values in rows.tolist()]
    assert stored == expected


def test_shipped_model_explanations_are_lightgbms_and_add_up(holdout: Dataset) -> None:
    model = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES)
    order = np.argsort(-model.score(holdout.matrix))
    rows = holdout.matrix[np.concatenate([order[:400], order[::97]])]
    assert_exact(DEFAULT_MODEL, rows)


def test_missing_values_follow_the_trees_default_direction(holdout: Dataset) -> None:
    rows = holdout.matrix[:300].copy()
    rows[::3, 0] = np.nan
    rows[1::3, 7] = np.nan
    assert_exact(DEFAULT_MODEL, rows)


def test_batched_explanations_sum_each_leafs_table_at_the_rows_pattern() -> None:
    """The batched layout (each distinct interval compared once, patterns built position by position
    over leaves of every depth, one gather, one sum per feature, block by block) gives what each
    leaf's own table gives for the row's agreement pattern, summed leaf by leaf, to float64 rounding.
    """
    rng = np.random.default_rng(7)
    width, thresholds = 12, np.linspace(-1.0, 1.0, 9)  # few thresholds: leaves share intervals
    leaves = []
    for _ in range(400):
        features = rng.permutation(width)[: rng.integers(1, 11)].tolist()
        bounds = np.sort(rng.choice(np.concatenate(([-np.inf, np.inf], thresholds)), size=(len(features), 2)), axis=1)
        upper = np.where(bounds[:, 0] == bounds[:, 1], np.inf, bounds[:, 1])
        leaves.append(
            _Leaf(
                float(rng.normal()),
                features,
                rng.uniform(0.05, 0.95, len(features)).tolist(),
                bounds[:, 0].tolist(),
                upper.tolist(),
                (rng.random(len(features)) < 0.5).tolist(),
            )
        )
    rows = rng.choice(np.concatenate((thresholds, rng.uniform(-1.5, 1.5, 40))), size=(3 * EXPLAIN_BLOCK_ROWS + 5, width))
    rows[rng.random(rows.shape) < 0.1] = np.nan
    rows = rows.astype(np.float32)

    expected = np.zeros(rows.shape, dtype=np.float64)
    for leaf in leaves:
        values = rows[:, leaf.features]
        agrees = np.where(
            np.isnan(values), leaf.missing_agrees, (values > np.float32(leaf.lower)) & (values <= np.float32(leaf.upper))
        )
        pattern = agrees.astype(np.int64) @ (1 << np.arange(len(leaf.features)))
        expected[:, leaf.features] += _leaf_table(leaf)[pattern]
    explanation = TreeExplainer(leaves, width, 0.25).explain(rows)
    assert explanation.base == 0.25
    np.testing.assert_allclose(explanation.contributions, expected, rtol=0, atol=1e-12)


def test_freshly_trained_model_explanations_are_lightgbms(ns: Namespace, tmp_path: Path) -> None:
    history = Simulator(
        SimulatorConfig(
            seed=9,
            n_customers=1_000,
            n_terminals=2_000,
            days=14,
            customer_compromises_per_day=2e-3,
            card_thefts_per_day=1.5e-3,
            terminal_compromises_per_day=4e-4,
        )
    ).history()
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(history.history_lines()) + b"\n")
    model_path = tmp_path / "team.onnx"
    result = ns.fraudd("train", "--history", str(path), "--out", str(model_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = dataset(redis.Redis(protocol=2), seed=4, n=5_000, label_delay_s=7 * 86_400.0)
    assert data.feature_names == FraudModel.load(model_path, FEATURE_NAMES).feature_names
    assert_exact(model_path, data.matrix)


def test_flagged_decisions_carry_their_explanation_to_postgres_alerts_and_fraudd_explain(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    generated = TransactionGenerator(GeneratorConfig(seed=21, start_ts=time.time() - 20_000)).generate(12_000)
    Publisher(redis_client, ns.stream).publish(generated.payloads())
    log = drain(redis_client, ns, tmp_path, "--workers", "1", "--batch-size", "400")
    assert '"dead_lettered"' not in log

    rows = ns.sql("SELECT transaction_id, decision, score, reasons, explanation FROM transactions")
    assert len(rows) > 10_000  # the generator mixes in duplicates and invalid entries
    flagged = [row for row in rows if row[1] != "approve"]
    assert len(flagged) > 50
    assert all(row[4] is None for row in rows if row[1] == "approve")
    for txid, _decision, score, reasons, explanation in flagged:
        contributions = explanation["contributions"]
        assert set(contributions) == set(FEATURE_NAMES)
        if 1e-4 < score < 0.999:
            raw = explanation["base"] + sum(contributions.values())
            assert abs(raw - float(logit(np.array([score]))[0])) < 1e-4, txid
        model_reasons = [code.removeprefix("model:") for code in reasons if code.startswith("model:")]
        assert all(contributions[name] > 0 for name in model_reasons)

    # The alert carries the explanation PostgreSQL holds.
    stored = {row[0]: row[4] for row in flagged}
    alerts = [orjson.loads(fields[b"data"]) for _id, fields in redis_client.xrange(ns.fraud_stream)]
    assert len(alerts) == len(flagged)
    assert all(alert["explanation"] == stored[alert["transaction_id"]] for alert in alerts)

    txid = flagged[0][0]
    shown = ns.fraudd("explain", txid)
    assert shown.returncode == 0, shown.stderr
    top = max(stored[txid]["contributions"].items(), key=lambda item: abs(item[1]))
    assert txid in shown.stdout and top[0] in shown.stdout
    as_json = orjson.loads(ns.fraudd("explain", txid, "--json").stdout)
    assert as_json["explanation"] == stored[txid] and as_json["decision"] == flagged[0][1]
    approved = next(row[0] for row in rows if row[1] == "approve")
    assert "no explanation stored" in ns.fraudd("explain", approved).stdout
    missing = ns.fraudd("explain", "no-such-transaction")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_label_features_in_training_see_only_labels_reported_before_each_row(ns: Namespace, tmp_path: Path) -> None:
    """A chargeback reported ten days after its fraud reaches the merchant's rows from then on, not before."""
    day = 86_400.0
    start = time.time() - 60 * day
    fraud_at = start + day

    def line(txid: str, at: float, label: int, **extra: object) -> bytes:
        message = {"transaction_id": txid, "user_id": f"u_{txid}", "amount": 20.0, "merchant": "shop_m", "timestamp": at}
        return orjson.dumps({**message, "label": label, **extra})

    lines = [
        line("reported_late", fraud_at, 1, reported_at=fraud_at + 10 * day),
        line("said_nothing", fraud_at, 1),  # taken as reported seven days later
        line("day_2", fraud_at + 1 * day, 0),
        line("day_8", fraud_at + 7 * day + 60, 0),
        line("day_11", fraud_at + 10 * day + 60, 0),
        line("day_40", fraud_at + 39 * day, 0),
    ]
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = featurize(redis.Redis(protocol=2), read_history(path), label_delay_s=7 * day)
    column = data.feature_names.index("merchant_fraud_28d")
    assert data.matrix[:, column].tolist() == [0, 0, 0, 1, 2, 0]
    assert data.matrix[:, data.feature_names.index("merchant_fraud_7d")].tolist() == [0, 0, 0, 0, 0, 0]
