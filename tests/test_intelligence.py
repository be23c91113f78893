"""Detection: the model's quality on held-out data, live == offline decisions, reloads, contract checks."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.keys import Keys
from fraudd.learning import history, train
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import FEATURE_NAMES, MESSAGE_FEATURES
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.model import META_FEATURES, FraudModel, ModelError
from fraudd.scoring.rules import DECISIONS, Rules
from fraudd.scoring.settings import DEFAULT_MODEL, DEFAULT_RULES
from fraudd.scoring.worker import score_batch

from .conftest import Namespace, wait_for
from .services import drain
from .streams import fully_drained


@pytest.fixture(scope="module")
def holdout() -> history.Dataset:
    client = redis.Redis(protocol=2)
    return history.dataset(client, seed=2, n=100_000)


def test_model_catches_fraud_on_held_out_data(holdout: history.Dataset) -> None:
    model = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES)
    scores = model.score(holdout.matrix)
    threshold = train.threshold_at_fpr(scores, holdout.is_fraud, 0.01)
    recall = (scores[holdout.is_fraud] >= threshold).mean()
    print(f"held-out recall at 1% FPR: {recall:.3f} over {holdout.is_fraud.sum()} fraudulent transactions")
    assert recall >= 0.90
    for code, name in enumerate(holdout.names[1:], start=1):
        rows = holdout.typology == code
        typology_recall = (scores[rows] >= threshold).mean()
        print(f"  {name}: {typology_recall:.3f} of {rows.sum()}")
        assert typology_recall >= 0.70, name


def test_single_message_model_cannot_catch_most_fraud(holdout: history.Dataset) -> None:
    training = history.dataset(redis.Redis(protocol=2), seed=1, n=100_000)
    columns = [FEATURE_NAMES.index(name) for name in MESSAGE_FEATURES]
    baseline = train.fit(training, columns, seed=1)
    scores = baseline.predict_proba(holdout.matrix[:, columns])[:, 1]
    threshold = train.threshold_at_fpr(scores, holdout.is_fraud, 0.01)
    recall = (scores[holdout.is_fraud] >= threshold).mean()
    print(f"single-message baseline recall at 1% FPR: {recall:.3f}")
    assert recall <= 0.40


def offline_decisions(client: redis.Redis, payloads: list[bytes]) -> dict[str, tuple[str, float, list[str]]]:
    """Score ``payloads`` the way the daemon does, without it: features on a scratch key prefix."""
    scratch = Keys(f"offline-{time.time_ns()}:raw", "unused", "unused")
    store = SharedFeatureStore(client, scratch, dedup_window_ms=3_600_000)
    model, rules = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES), Rules.load(DEFAULT_RULES)
    decided = {}
    try:
        for start in range(0, len(payloads), 500):
            chunk = payloads[start : start + 500]
            batch = decode_batch([f"{start + i + 1}-0" for i in range(len(chunk))], chunk)
            features = store.compute(batch)
            scores, decision, reasons, *_ = score_batch(model, rules, features, model.review_threshold, model.decline_threshold)
            for txid, score, code, why in zip(batch.transaction_id, scores.tolist(), decision.tolist(), reasons):
                decided[txid] = (DECISIONS[code], score, why)
    finally:
        keys = list(client.scan_iter(match=f"{scratch.prefix}*", count=10_000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    return decided


def test_pipeline_decides_exactly_as_offline_scoring(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    generated = TransactionGenerator(GeneratorConfig(seed=11, start_ts=time.time() - 30_000)).generate(30_000)
    payloads = generated.payloads()
    Publisher(redis_client, ns.stream).publish(payloads)
    # One worker keeps the event-time order in which each user's behaviour state is built.
    drain(redis_client, ns, tmp_path, "--workers", "1", "--batch-size", "300")
    live = {
        txid: (decision, score, list(reasons))
        for txid, decision, score, reasons in ns.sql("SELECT transaction_id, decision, score, reasons FROM transactions")
    }
    offline = offline_decisions(redis_client, payloads)
    assert live.keys() == offline.keys() and len(live) == 30_000
    disagreements = [txid for txid in live if live[txid][0] != offline[txid][0] or live[txid][2] != offline[txid][2]]
    assert disagreements == []
    assert max(abs(live[t][1] - offline[t][1]) for t in live) < 1e-6
    flagged = sum(1 for decision, _s, _r in live.values() if decision != "approve")
    print(f"{len(live)} transactions, {flagged} flagged, identical decisions and reasons live and offline")


def publish_and_drain(redis_client: redis.Redis, ns: Namespace, payloads: list[bytes]) -> None:
    Publisher(redis_client, ns.stream).publish(payloads)
    wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to drain")


def test_sighup_reloads_rules_and_model_and_refuses_bad_files(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    rules_path, model_path = tmp_path / "rules.toml", tmp_path / "fraud.onnx"
    rules_path.write_bytes(DEFAULT_RULES.read_bytes())
    model_path.write_bytes(DEFAULT_MODEL.read_bytes())
    generator = TransactionGenerator(GeneratorConfig(seed=12, start_ts=time.time() - 3000))
    daemon = ns.start("--workers", "2", "--rules-path", str(rules_path), ML_MODEL_PATH=str(model_path))

    def rows_of(generated) -> list[tuple]:
        return ns.sql(
            "SELECT decision, reasons, model_version FROM transactions WHERE transaction_id = ANY(%s)",
            (generated.transaction_ids,),
        )

    def reload() -> None:
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # workers swap at their next batch boundary (every --block-ms when idle)

    try:
        before = generator.generate(200)
        publish_and_drain(redis_client, ns, before.payloads())
        assert not any("R_EVERYTHING" in reasons for _d, reasons, _v in rows_of(before))

        rules_path.write_text(
            DEFAULT_RULES.read_text() + '\n[[rule]]\ncode = "R_EVERYTHING"\nreason = "test"\n'
            'action = "review"\nfeature = "amount"\nop = ">"\nvalue = 0\n'
        )
        reload()
        after = generator.generate(200)
        publish_and_drain(redis_client, ns, after.payloads())
        assert all("R_EVERYTHING" in reasons and decision != "approve" for decision, reasons, _v in rows_of(after))

        rules_path.write_text(
            '[[rule]]\ncode = "R_BROKEN"\nreason = "x"\naction = "review"\nfeature = "no_such"\nop = ">"\nvalue = 1\n'
        )
        model_path.write_bytes(b"not a model")
        reload()
        kept = generator.generate(200)
        publish_and_drain(redis_client, ns, kept.payloads())
        rows = rows_of(kept)
        assert len(rows) == 200
        assert all("R_EVERYTHING" in reasons for _d, reasons, _v in rows)
        assert {version for _d, _r, version in rows} == {FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).version}
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr[-2000:]
    assert stderr.count('"reloaded"') == 2  # both workers took the good rules
    assert stderr.count('"reload_refused"') == 2  # and both refused the bad files
    assert ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")[0] == (600, 600)


def test_model_with_other_features_is_refused(ns: Namespace, tmp_path: Path) -> None:
    model = onnx.load(str(DEFAULT_MODEL))
    for prop in model.metadata_props:
        if prop.key == META_FEATURES:
            prop.value = orjson.dumps(list(reversed(FEATURE_NAMES))).decode()
    wrong = tmp_path / "reordered.onnx"
    onnx.save(model, str(wrong))
    with pytest.raises(ModelError, match="different order"):
        FraudModel.load(wrong, FEATURE_NAMES)
    result = ns.fraudd("run", timeout=30, ML_MODEL_PATH=str(wrong))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "feature contract mismatch" in result.stderr


def test_model_reasons_name_features(holdout: history.Dataset) -> None:
    model = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES)
    flagged = holdout.matrix[holdout.is_fraud][:50]
    reasons, explanations = model.explain(flagged)
    assert len(reasons) == len(explanations) == 50
    for codes, explanation in zip(reasons, explanations):
        assert 1 <= len(codes) <= 2 and all(code.removeprefix("model:") in FEATURE_NAMES for code in codes)
        # Named by what pushed the score up, strongest first.
        pushed = [explanation["contributions"][code.removeprefix("model:")] for code in codes]
        assert all(c > 0 for c in pushed) and pushed == sorted(pushed, reverse=True)
    assert np.isfinite(model.score(flagged)).all()
