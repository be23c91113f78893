"""The learning loop on traffic fraudd was not designed for: the second simulator, ``fraudd train``."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from fraudd.ingest import Publisher
from fraudd.keys import Keys
from fraudd.learning.labels import parse_labels
from fraudd.learning.report import recall_at_fpr
from fraudd.learning.simulator import (
    COMPROMISED_CUSTOMER,
    COMPROMISED_TERMINAL,
    STOLEN_CARD,
    TYPOLOGIES,
    SimulatedHistory,
    Simulator,
    SimulatorConfig,
)
from fraudd.scoring.confirmed import ConfirmedFraud
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.model import FraudModel
from fraudd.scoring.settings import DEFAULT_MODEL, DEFAULT_RULES

from .conftest import Namespace, wait_for
from .services import drain, start, stop
from .streams import UNREADABLE_LABELS, feed_labels_service, fully_drained, wait_labels_stored
from .test_intelligence import offline_decisions
from .test_observability import free_port, http_get
from .test_settings import imported

# Small enough for tens of seconds through the live pipeline; a portfolio under heavier attack than
# the default, so that 24 days hold enough fraud of each typology to learn from (~1,500).
SMALL = SimulatorConfig(
    seed=5,
    n_customers=2_000,
    n_terminals=4_000,
    days=24,
    customer_compromises_per_day=2e-3,
    card_thefts_per_day=1.5e-3,
    terminal_compromises_per_day=4e-4,
)


@pytest.fixture(scope="module")
def history() -> SimulatedHistory:
    return Simulator(SMALL).history()


@pytest.fixture(scope="module")
def terminal_traffic() -> SimulatedHistory:
    """20 days of a portfolio whose terminals get compromised, for the tests of the label-fed counts."""
    return Simulator(
        SimulatorConfig(seed=12, n_customers=2_000, n_terminals=2_000, days=20, terminal_compromises_per_day=1e-3)
    ).history()


def write_history(path: Path, history: SimulatedHistory) -> Path:
    path.write_bytes(b"\n".join(history.history_lines()) + b"\n")
    return path


def test_simulator_is_seeded_labelled_and_valid_input(history: SimulatedHistory) -> None:
    again = Simulator(SMALL).history()
    assert again.payloads()[:2000] == history.payloads()[:2000] and len(again) == len(history)
    other = Simulator(SimulatorConfig(seed=6, n_customers=200, n_terminals=400, days=5)).history()
    assert not set(other.transaction_id[:1000]) & set(history.transaction_id)
    assert np.all(np.diff(history.timestamp) >= 0)
    batch = decode_batch([f"{i + 1}-0" for i in range(len(history))], history.payloads())
    assert batch.rejected == [] and len(batch) == len(history)
    counts = {name: int((history.typology == code).sum()) for code, name in enumerate(TYPOLOGIES)}
    print(counts)
    assert 0.005 < history.is_fraud.mean() < 0.03
    assert all(counts[name] >= 50 for name in TYPOLOGIES[1:])


def test_simulator_fraud_mechanics(history: SimulatedHistory) -> None:
    stolen = history.take(history.typology == STOLEN_CARD)
    legit = history.take(~history.is_fraud)
    # A stolen card is used online from a device and a country no legitimate transaction of the
    # account ever shows.
    assert set(stolen.channel) == {"ecom"}
    assert not set(stolen.device_id) & set(legit.device_id)
    assert not set(stolen.country) & set(legit.country)
    # A compromised terminal's fraud happens at terminals where legitimate traffic happens too, at
    # ordinary amounts; a compromised customer's at five times the usual.
    at_terminals = history.take(history.typology == COMPROMISED_TERMINAL)
    assert set(at_terminals.terminal) <= set(legit.terminal)
    assert 0.5 < np.median(at_terminals.amount) / np.median(legit.amount) < 2.0
    assert np.median(history.amount[history.typology == COMPROMISED_CUSTOMER]) > 3 * np.median(legit.amount)


def test_train_refuses_unusable_history_in_one_line(ns: Namespace, tmp_path: Path, history: SimulatedHistory) -> None:
    lines = history.history_lines()
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\n".join(lines[:99] + [b'{"transaction_id": "t1", "label": 0'] + lines[100:]) + b"\n")
    result = ns.fraudd("train", "--history", str(broken), "--out", str(tmp_path / "m.onnx"), PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{broken} line 100: not JSON" in result.stderr
    assert imported(result.stderr).isdisjoint({"lightgbm", "sklearn"})  # refused before the training libraries load

    invalid = tmp_path / "invalid.jsonl"
    bad = lines[1234].replace(b'"amount":', b'"amount":-')
    invalid.write_bytes(b"\n".join(lines[:1234] + [bad] + lines[1235:]) + b"\n")
    result = ns.fraudd("train", "--history", str(invalid), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{invalid} line 1235: invalid_field" in result.stderr

    legit_only = tmp_path / "legit.jsonl"
    legit_only.write_bytes(b"\n".join(line for line in lines[:20_000] if b'"label":0' in line) + b"\n")
    result = ns.fraudd("train", "--history", str(legit_only), "--out", str(tmp_path / "m.onnx"), PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "too few fraudulent transactions: 0 in the fit part" in result.stderr
    assert imported(result.stderr).isdisjoint({"lightgbm", "sklearn"})
    assert not (tmp_path / "m.onnx").exists()


def test_model_trained_on_first_60_percent_beats_plain_rules_live_and_shadow_agrees_offline(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, history: SimulatedHistory
) -> None:
    cut = int(len(history) * 0.6)
    model = tmp_path / "team.onnx"
    result = ns.fraudd(
        "train",
        "--history",
        str(write_history(tmp_path / "first60.jsonl", history.take(slice(0, cut)))),
        "--out",
        str(model),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "features:" in result.stderr  # progress is shown
    card = model.with_suffix(".md").read_text()
    assert "compromised_terminal" in card and "amount over a threshold" in card

    # The trained model decides; the shipped one runs in shadow beside it.
    payloads = history.payloads()
    Publisher(redis_client, ns.stream).publish(payloads)
    drain(
        redis_client,
        ns,
        tmp_path,
        "--workers",
        "1",
        "--model-path",
        str(model),
        "--shadow-model",
        str(DEFAULT_MODEL),
        timeout=300,
    )
    later = set(history.transaction_id[cut:].tolist())
    fraud = {txid for txid, bad in zip(history.transaction_id.tolist(), history.is_fraud.tolist()) if bad}
    rows = ns.sql("""SELECT transaction_id, score, amount,
                            count(*) OVER (PARTITION BY user_id ORDER BY event_time
                                           RANGE BETWEEN interval '1 hour' PRECEDING AND CURRENT ROW),
                            shadow_score, shadow_decision, shadow_model_version
                     FROM transactions""")
    assert len(rows) == len(history)
    recent = [row for row in rows if row[0] in later]
    is_fraud = np.array([row[0] in fraud for row in recent])
    score, amount, velocity = (np.array([row[i] for row in recent], dtype=np.float64) for i in (1, 2, 3))
    model_recall = recall_at_fpr(score, is_fraud, 0.01)
    rules = {"amount": recall_at_fpr(amount, is_fraud, 0.01), "count_1h": recall_at_fpr(velocity, is_fraud, 0.01)}
    print(f"last 40%: {is_fraud.sum()} fraud of {len(recent)}; recall at 1% FPR: model {model_recall:.3f}, rules {rules}")
    assert model_recall > max(rules.values()) + 0.05

    # The shadow columns are what a separate offline scoring with the shipped model gives.
    offline = offline_decisions(redis_client, payloads)
    shipped = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).version
    assert {row[6] for row in rows} == {shipped}
    assert [txid for txid, *_r, shadow_decision, _v in rows if shadow_decision != offline[txid][0]] == []
    assert max(abs(row[4] - offline[row[0]][1]) for row in rows) < 1e-6

    # And so is the report, once chargebacks came back as labels.
    labels = tmp_path / "chargebacks.jsonl"
    labels.write_bytes(b"\n".join(orjson.dumps({"transaction_id": t, "label": "fraud"}) for t in sorted(fraud)))
    assert ns.fraudd("label", "--file", str(labels)).returncode == 0
    result = ns.fraudd("models", "report", "--since", "60d", PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0, result.stderr
    assert imported(result.stderr).isdisjoint({"lightgbm", "sklearn", "onnx"})  # a report needs no training library
    print(result.stdout)
    report = {line[:24].strip(): line[24:].split() for line in result.stdout.splitlines()[1:]}
    every = np.array([row[0] in fraud for row in rows])
    shadow_scores = np.array([offline[row[0]][1] for row in rows])
    shadow_alerts = np.array([offline[row[0]][0] != "approve" for row in rows])
    assert report["model"] == [FraudModel.load(model, FEATURE_NAMES).version, shipped]
    assert report["alerts"][1] == f"{int(shadow_alerts.sum()):,}"
    assert report["recall at thresholds"][1] == f"{(shadow_alerts & every).sum() / every.sum():.1%}"
    assert report["recall at 1% FPR"][1] == f"{recall_at_fpr(shadow_scores, every, 0.01):.1%}"
    assert report["recall at 0.1% FPR"][1] == f"{recall_at_fpr(shadow_scores, every, 0.001):.1%}"


def flagged_share(ns: Namespace, history: SimulatedHistory, legit: bool) -> float:
    ids = history.transaction_id[history.is_fraud != legit].tolist()
    (share,) = ns.sql("SELECT avg((decision <> 'approve')::int) FROM transactions WHERE transaction_id = ANY(%s)", (ids,))[0]
    return float(share)


def test_shipped_model_calibrated_to_one_percent_keeps_legit_alerts_low(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A new team's first weeks: run the shipped model, calibrate on what it scored, then decide."""
    traffic = Simulator(SimulatorConfig(seed=8, n_customers=2_000, n_terminals=4_000, days=14)).history()
    half = int(len(traffic) * 0.5)
    first, second = traffic.take(slice(0, half)), traffic.take(slice(half, len(traffic)))
    Publisher(redis_client, ns.stream).publish(first.payloads())
    drain(redis_client, ns, tmp_path, "--workers", "1")
    before, caught_before = flagged_share(ns, first, legit=True), flagged_share(ns, first, legit=False)

    thresholds = tmp_path / "thresholds.json"
    budget = ("--target-review-rate", "0.009", "--target-decline-rate", "0.001", "--since", "30d", "--out", str(thresholds))
    result = ns.fraudd("calibrate", *budget)
    assert result.returncode == 0, result.stderr
    print(result.stdout.strip())
    # This traffic's customers shop across borders: two default rules alone review more than the
    # budget, so the team runs them in shadow (still stored in reasons) and calibrates again.
    assert "rules alone exceed the budget" in result.stderr and "R_COUNTRY_HOP" in result.stdout
    rules = tmp_path / "rules.toml"
    text = DEFAULT_RULES.read_text()
    for code in ("R_COUNTRY_HOP", "R_NEW_DEVICE_NEW_COUNTRY"):
        head, tail = text.split(f'code = "{code}"')
        text = head + f'code = "{code}"' + tail.replace('action = "review"', 'action = "shadow"', 1)
    rules.write_text(text)
    result = ns.fraudd("calibrate", *budget, "--rules-path", str(rules))
    assert result.returncode == 0 and "exceed" not in result.stderr, result.stderr
    print(result.stdout.strip())
    calibrated = orjson.loads(thresholds.read_bytes())
    assert calibrated["calibration"]["transactions"] == len(first)
    assert calibrated["calibration"]["expected_review_rate"] + calibrated["calibration"]["expected_decline_rate"] <= 0.01

    Publisher(redis_client, ns.stream).publish(second.payloads())
    drain(redis_client, ns, tmp_path, "--workers", "1", "--thresholds", str(thresholds), "--rules-path", str(rules))
    after = flagged_share(ns, second, legit=True)
    caught = flagged_share(ns, second, legit=False)
    print(
        f"legit flagged: {before:.2%} with the model's own thresholds, {after:.2%} calibrated; "
        f"fraud flagged: {caught_before:.1%}, then {caught:.1%}"
    )
    assert after <= 0.015


def test_thresholds_file_for_another_model_is_refused(ns: Namespace, tmp_path: Path) -> None:
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_bytes(orjson.dumps({"review_threshold": 0.2, "decline_threshold": 0.9, "model_version": "other"}))
    result = ns.fraudd("run", FRAUDD_THRESHOLDS=str(thresholds), timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "calibrated for model other" in result.stderr


def test_thresholds_file_is_reloaded_on_sighup(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    version = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).version
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_bytes(orjson.dumps({"review_threshold": 1.0, "decline_threshold": 1.0, "model_version": version}))
    quiet = tmp_path / "rules.toml"
    quiet.write_text('[[rule]]\ncode = "R_TRY"\nreason = "tried"\naction = "shadow"\nfeature = "amount"\nop = ">"\nvalue = 0\n')
    traffic = Simulator(SimulatorConfig(seed=9, n_customers=100, n_terminals=200, days=3)).history()
    parts = [traffic.take(slice(i * 200, (i + 1) * 200)) for i in range(3)]
    port = free_port()
    daemon = ns.start(
        "--workers",
        "1",
        "--thresholds",
        str(thresholds),
        "--rules-path",
        str(quiet),
        "--shadow-model",
        str(DEFAULT_MODEL),
        "--metrics-port",
        str(port),
    )

    def decisions(part: SimulatedHistory) -> set[str]:
        Publisher(redis_client, ns.stream).publish(part.payloads())
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to drain")
        return {
            d
            for (d,) in ns.sql(
                "SELECT decision FROM transactions WHERE transaction_id = ANY(%s)", (part.transaction_id.tolist(),)
            )
        }

    try:
        assert decisions(parts[0]) == {"approve"}
        thresholds.write_bytes(orjson.dumps({"review_threshold": 0.0, "decline_threshold": 1.0, "model_version": version}))
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert decisions(parts[1]) == {"review"}
        thresholds.write_bytes(orjson.dumps({"review_threshold": 0.0, "decline_threshold": 0.0, "model_version": "other"}))
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert decisions(parts[2]) == {"review"}  # the file for another model is refused, the last one kept
        # The shadow rule decided nothing but was counted; champion and challenger decisions by pair.
        _status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("fraudd_rule_hits_total{", "fraudd_shadow_decisions_total{"))
        }
        assert samples['fraudd_rule_hits_total{action="shadow",rule="R_TRY"}'] == 600
        assert sum(v for k, v in samples.items() if k.startswith("fraudd_shadow_decisions_total")) == 600
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr[-2000:]
    assert stderr.count('"reloaded"') == 1 and stderr.count('"reload_refused"') == 1


def test_label_file_is_idempotent_keeps_history_and_latest_verdict(ns: Namespace, tmp_path: Path) -> None:
    first = tmp_path / "chargebacks.csv"
    first.write_text(
        "transaction_id,label,source,reported_at\n"
        "t1,fraud,chargeback,2026-11-01T10:00:00Z\n"
        "t2,legit,analyst,1793000000\n"
        "t3,fraud,,\n"
    )
    for _ in range(2):
        result = ns.fraudd("label", "--file", str(first))
        assert result.returncode == 0, result.stderr
    assert "0 new reports" in result.stdout
    later = tmp_path / "review.jsonl"
    later.write_text(
        '{"transaction_id": "t1", "label": "legit", "source": "analyst", "reported_at": "2026-11-03T00:00:00Z"}\n'
        '{"transaction_id": "t2", "label": 1, "source": "chargeback", "reported_at": 1793000000}\n'
    )
    assert ns.fraudd("label", "--file", str(later)).returncode == 0
    latest = dict(ns.sql("SELECT transaction_id, label || ':' || source FROM labels"))
    # t1: a later verdict wins; t2: at the same time, fraud wins; t3: the file's name is its source.
    assert latest == {"t1": "legit:analyst", "t2": "fraud:chargeback", "t3": "fraud:file:chargebacks.csv"}
    assert ns.sql("SELECT count(*) FROM label_history")[0][0] == 5

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"transaction_id": "t4", "label": "fraud"}\n{"transaction_id": "t5", "label": "maybe"}\n')
    result = ns.fraudd("label", "--file", str(bad))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{bad} line 2: label must be" in result.stderr
    assert ns.sql("SELECT count(*) FROM labels WHERE transaction_id = 't4'")[0][0] == 0  # all or nothing


def test_labels_stream_lands_in_the_table_once_and_bad_entries_in_the_dlq(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    good, _errors = parse_labels(
        [
            {
                "transaction_id": f"tx{i}",
                "label": "fraud" if i % 3 == 0 else "legit",
                "source": "chargeback",
                "reported_at": 1793000000 + i,
            }
            for i in range(500)
        ]
    )
    feed_labels_service(redis_client, ns, good, resent=100)
    daemon = ns.start_command("labels", "--workers", "1")
    try:
        wait_labels_stored(redis_client, ns, 500, 60)
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr[-2000:]
    assert ns.sql("SELECT count(*), count(*) FILTER (WHERE label = 'fraud') FROM labels")[0] == (500, 167)
    assert ns.sql("SELECT count(*) FROM label_history")[0][0] == 500
    reasons = sorted(fields[b"reason"].decode() for _id, fields in redis_client.xrange(ns.dlq_stream))
    assert reasons == ["invalid_field", "invalid_json"]
    # Replayed, they go back to the labels stream, not onto the transactions' input.
    replayed = ns.fraudd("dlq", "replay", "--all")
    assert replayed.returncode == 0 and f"replayed 0 entries onto {ns.stream}, 2 onto {ns.labels_stream}" in replayed.stdout
    assert redis_client.xlen(ns.stream) == 0 and redis_client.xlen(ns.dlq_stream) == 0
    assert [fields[b"data"] for _id, fields in redis_client.xrange(ns.labels_stream)][-2:] == list(UNREADABLE_LABELS)


def test_train_from_postgres_and_backtest_of_the_running_model(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    traffic = Simulator(
        SimulatorConfig(
            seed=10, n_customers=300, n_terminals=600, days=20, card_thefts_per_day=4e-3, customer_compromises_per_day=4e-3
        )
    ).history()
    Publisher(redis_client, ns.stream).publish(traffic.payloads())
    drain(redis_client, ns, tmp_path, "--workers", "1")
    chargebacks = tmp_path / "chargebacks.jsonl"
    chargebacks.write_bytes(
        b"\n".join(
            orjson.dumps({"transaction_id": txid, "label": "fraud", "source": "chargeback"})
            for txid in traffic.transaction_id[traffic.is_fraud].tolist()
        )
    )
    assert ns.fraudd("label", "--file", str(chargebacks)).returncode == 0
    model = tmp_path / "team.onnx"
    result = ns.fraudd("train", "--from-postgres", "--since", "30d", "--out", str(model), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    card = model.with_suffix(".md").read_text()
    assert f"PostgreSQL schema {ns.schema} (transactions joined with {int(traffic.is_fraud.sum()):,} labels)" in card
    assert f"{len(traffic):,} labelled transactions ({int(traffic.is_fraud.sum()):,} fraud)" in card
    trained = FraudModel.load(model, FEATURE_NAMES)
    assert trained.version.startswith("lgbm-") and 0.0 < trained.review_threshold <= trained.decline_threshold < 1.0
    # Replaying the stored rows through the running model and rules reproduces every decision.
    result = ns.fraudd("backtest", "--model", str(DEFAULT_MODEL), "--rules", str(DEFAULT_RULES), "--since", "30d", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    assert f"{len(traffic):,} stored transactions" in result.stdout
    assert "decisions that would change: 0\n" in result.stdout
    stored_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("stored"))
    candidate_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("candidate"))
    assert stored_line.split(None, 1)[1] == candidate_line.split(None, 1)[1]


def test_confirmed_fraud_counts_raise_recall_on_compromised_terminals(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, terminal_traffic: SimulatedHistory
) -> None:
    """Chargebacks of the first ten days teach the scoring which terminals were compromised."""
    traffic = terminal_traffic
    half = int(np.searchsorted(traffic.timestamp, traffic.timestamp[0] + 10 * 86400.0))
    first, second = traffic.take(slice(0, half)), traffic.take(slice(half, len(traffic)))
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\ncode = "R_CONFIRMED_MERCHANT"\nreason = "two frauds confirmed at this merchant within 7 days"\n'
        'action = "review"\nfeature = "merchant_fraud_7d"\nop = ">="\nvalue = 2\n'
    )
    run = ("--workers", "1", "--rules-path", str(rules), "--review-threshold", "0.98", "--decline-threshold", "0.997")
    Publisher(redis_client, ns.stream).publish(first.payloads())
    drain(redis_client, ns, tmp_path, *run)
    chargebacks = tmp_path / "chargebacks.jsonl"
    chargebacks.write_bytes(
        b"\n".join(
            # Reported by the end of day 10: they count for every transaction of days 11-20.
            orjson.dumps(
                {"transaction_id": t, "label": "fraud", "source": "chargeback", "reported_at": float(second.timestamp[0])}
            )
            for t in first.transaction_id[first.is_fraud].tolist()
        )
    )
    assert ns.fraudd("label", "--file", str(chargebacks)).returncode == 0
    assert ns.fraudd("label", "--file", str(chargebacks)).returncode == 0  # twice: counted once
    merchants, counts = np.unique(first.merchant[first.is_fraud], return_counts=True)
    busiest = merchants[counts.argmax()]
    state = f"{Keys(ns.stream, ns.fraud_stream, ns.dlq_stream).prefix}confirmed:merchant"
    assert len(redis_client.hget(state, busiest).split(b";")) == counts.max()
    # An analyst clears one of them later: it no longer counts.
    cleared = first.transaction_id[first.is_fraud & (first.merchant == busiest)][0]
    reversal = tmp_path / "reversal.jsonl"
    reversal.write_bytes(
        orjson.dumps({"transaction_id": cleared, "label": "legit", "source": "analyst", "reported_at": time.time() + 60})
    )
    assert ns.fraudd("label", "--file", str(reversal)).returncode == 0
    assert len(redis_client.hget(state, busiest).split(b";")) == counts.max() - 1
    assert cleared.encode() not in redis_client.hget(state, busiest)
    Publisher(redis_client, ns.stream).publish(second.payloads())
    drain(redis_client, ns, tmp_path, *run)

    stored = {
        txid: (decision, reasons, score)
        for txid, decision, reasons, score in ns.sql("SELECT transaction_id, decision, reasons, score FROM transactions")
    }
    assert len(stored) == len(traffic)

    def share(rows: SimulatedHistory, flagged) -> float:
        return float(np.mean([flagged(*stored[txid]) for txid in rows.transaction_id.tolist()]))

    with_labels = lambda decision, reasons, score: decision != "approve"  # noqa: E731
    without = lambda decision, reasons, score: score >= 0.98  # noqa: E731  (the only other reason here)
    terminals = second.take(second.typology == COMPROMISED_TERMINAL)
    legit = second.take(~second.is_fraud)
    before = share(first.take(first.typology == COMPROMISED_TERMINAL), with_labels)
    recall, baseline = share(terminals, with_labels), share(terminals, without)
    cost = share(legit, with_labels) - share(legit, without)
    print(
        f"compromised terminals, days 11-20 ({len(terminals)}): {recall:.1%} flagged with the chargebacks of days "
        f"1-10, {baseline:.1%} without (days 1-10, no labels yet: {before:.1%}); legit flagged by the rule: {cost:.2%}"
    )
    assert recall >= baseline + 0.3 and before < 0.1
    assert cost < 0.02


def test_confirmed_fraud_state_forgets_entities_after_28_days(redis_client: redis.Redis) -> None:
    keys = Keys(f"t{time.time_ns()}:transactions:raw", "unused", "unused")
    confirmed = ConfirmedFraud(redis_client, keys)
    now_ms = int(time.time() * 1000)
    day = 86_400_000
    try:
        confirmed.record([("recent", ("shop_1", None, None, "card_1"), now_ms - 3 * day, now_ms - day, True)])
        batch = (["shop_1", "shop_2"], [None, None], [None, None], ["card_1", "card_2"])
        counts = confirmed.counts(batch, np.array([now_ms] * 2))
        assert counts["merchant_fraud_7d"].tolist() == [1, 0] and counts["card_fraud_28d"].tolist() == [1, 0]
        # A late chargeback for a fraud 40 days old, and the same label again: nothing is kept for it.
        old = ("old", ("shop_2", None, None, "card_2"), now_ms - 40 * day, now_ms, True)
        confirmed.record([old, old])
        assert redis_client.hkeys(f"{keys.prefix}confirmed:merchant") == [b"shop_1"]
        counts = confirmed.counts(batch, np.array([now_ms] * 2))  # the copy follows the version
        assert counts["merchant_fraud_28d"].tolist() == [1, 0] and counts["card_fraud_28d"].tolist() == [1, 0]
        # The verdict reversed: shop_1 forgets it too.
        confirmed.record([("recent", ("shop_1", None, None, "card_1"), now_ms - 3 * day, now_ms, False)])
        assert not redis_client.exists(f"{keys.prefix}confirmed:merchant")
        assert confirmed.counts(batch, np.array([now_ms] * 2))["merchant_fraud_28d"].tolist() == [0, 0]
    finally:
        redis_client.delete(*redis_client.keys(f"{keys.prefix}confirmed:*"))


def test_confirmed_fraud_is_seen_only_by_transactions_after_its_report(redis_client: redis.Redis) -> None:
    """A label reported after a transaction's event time never reaches that transaction's features."""
    keys = Keys(f"t{time.time_ns()}:transactions:raw", "unused", "unused")
    confirmed = ConfirmedFraud(redis_client, keys)
    now_ms = int(time.time() * 1000)
    day = 86_400_000
    try:
        # Fraud at shop_1 ten days ago, its chargeback reported three days ago.
        confirmed.record([("fraud", ("shop_1", None, None, None), now_ms - 10 * day, now_ms - 3 * day, True)])
        # Late events at shop_1 between the fraud and its report, then one after the report.
        times = np.array([now_ms - 9 * day, now_ms - 3 * day - 1, now_ms - 3 * day, now_ms])
        counts = confirmed.counts((["shop_1"] * 4, [None] * 4, [None] * 4, [None] * 4), times)
        assert counts["merchant_fraud_28d"].tolist() == [0, 0, 1, 1]
        # State written before reports were kept counts as reported long ago.
        redis_client.hset(f"{keys.prefix}confirmed:merchant", "shop_2", f"legacy={now_ms - 2 * day}")
        redis_client.incr(confirmed.version_key)
        counts = confirmed.counts((["shop_2"], [None], [None], [None]), np.array([now_ms - day]))
        assert counts["merchant_fraud_7d"].tolist() == [1]
    finally:
        redis_client.delete(*redis_client.keys(f"{keys.prefix}confirmed:*"))


def test_label_features_catch_compromised_terminals_through_the_live_pipeline(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, terminal_traffic: SimulatedHistory
) -> None:
    """A model fitted on the label-fed counts, point in time, catches what no per-customer feature can.

    Trained on the first 60% of a portfolio; then the last 40% is scored live, day by day, while its
    chargebacks come back as the simulator reports them (each counted only from its report on).
    """
    traffic = terminal_traffic
    cut = int(len(traffic) * 0.6)
    model = tmp_path / "team.onnx"
    trained = ns.fraudd(
        "train",
        "--history",
        str(write_history(tmp_path / "first60.jsonl", traffic.take(slice(0, cut)))),
        "--out",
        str(model),
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert FraudModel.load(model, FEATURE_NAMES).uses_label_features

    def report_chargebacks(rows: SimulatedHistory) -> None:
        fraud = rows.is_fraud
        path = tmp_path / "chargebacks.jsonl"
        path.write_bytes(
            b"\n".join(
                orjson.dumps({"transaction_id": txid, "label": "fraud", "source": "chargeback", "reported_at": at})
                for txid, at in zip(rows.transaction_id[fraud].tolist(), rows.reported_at[fraud].tolist())
            )
        )
        assert ns.fraudd_in_process("label", "--file", str(path)).exit_code == 0

    daemon = start(ns, tmp_path, "--workers", "1", "--model-path", str(model))
    try:
        publisher = Publisher(redis_client, ns.stream)
        chunks = [slice(0, cut)]
        day_starts = np.searchsorted(traffic.timestamp, np.arange(traffic.timestamp[cut], traffic.timestamp[-1], 86_400.0))
        chunks += [slice(a, b) for a, b in zip([cut, *day_starts[1:]], [*day_starts[1:], len(traffic)])]
        for rows in chunks:
            part = traffic.take(rows)
            publisher.publish(part.payloads())
            wait_for(lambda: fully_drained(redis_client, ns), 180, message="the stream to be drained")
            report_chargebacks(part)
    finally:
        stop(daemon)

    later = traffic.take(slice(cut, len(traffic)))
    scores = dict(
        ns.sql("SELECT transaction_id, score FROM transactions WHERE transaction_id = ANY(%s)", (later.transaction_id.tolist(),))
    )
    score = np.array([scores[t] for t in later.transaction_id.tolist()])
    recall = recall_at_fpr(score, later.is_fraud, 0.01)
    terminals = later.typology == COMPROMISED_TERMINAL
    terminal_recall = recall_at_fpr(score[terminals | ~later.is_fraud], later.is_fraud[terminals | ~later.is_fraud], 0.01)
    print(
        f"last 40% live ({len(later):,}, {int(later.is_fraud.sum())} fraud): recall at 1% FPR {recall:.1%}, "
        f"compromised terminals {terminal_recall:.1%} ({int(terminals.sum())})"
    )
    assert terminal_recall >= 0.5 and recall >= 0.65


def test_train_without_the_train_extra_names_it_in_one_line(ns: Namespace, tmp_path: Path) -> None:
    # The daemon's own virtualenv has the extra; an interpreter that cannot import lightgbm stands
    # in for one installed without it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'lightgbm':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n"
    )
    result = ns.fraudd("train", "--generated", "1000", "--out", str(tmp_path / "m.onnx"), PYTHONPATH=str(site))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: fraudd train needs the train extra (lightgbm is missing): pip install 'fraudd[train]'"
    ]
    assert not (tmp_path / "m.onnx").exists()
