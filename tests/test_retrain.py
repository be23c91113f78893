"""Retraining that cannot make things worse, models followed live by running workers, and drift metrics."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher
from fraudd.learning.simulator import SimulatedHistory, Simulator, SimulatorConfig
from fraudd.scoring.features import FEATURE_NAMES, MESSAGE_FEATURES
from fraudd.scoring.model import FraudModel
from fraudd.scoring.settings import DEFAULT_MODEL

from .conftest import Namespace, wait_for
from .services import DaemonProcess, drain, stop
from .streams import fully_drained
from .test_intelligence import offline_decisions
from .test_observability import free_port, http_get
from .test_settings import imported

# The team's own portfolio, from the second simulator: what the shipped generic model was not made for.
PORTFOLIO = SimulatorConfig(
    seed=5,
    n_customers=1_500,
    n_terminals=3_000,
    days=20,
    customer_compromises_per_day=2e-3,
    card_thefts_per_day=1.5e-3,
    terminal_compromises_per_day=4e-4,
)
WINDOW_DAYS = 5


@pytest.fixture(scope="module")
def portfolio() -> SimulatedHistory:
    return Simulator(PORTFOLIO).history()


def fresh_traffic(seed: int, n: int = 1_500) -> list[bytes]:
    """``n`` transactions of the generic generator by users, cards and devices of their own (the
    generator names them the same for every seed): nothing scored before shares their state."""
    generated = TransactionGenerator(GeneratorConfig(seed=seed, start_ts=time.time() - n / 5.0, tx_per_second=5.0)).generate(n)
    payloads = []
    for payload in generated.payloads():
        message = orjson.loads(payload)
        for key in ("transaction_id", "user_id", "card_id", "device_id"):
            if key in message:
                message[key] = f"s{seed}-{message[key]}"
        payloads.append(orjson.dumps(message))
    return payloads


def probe(redis_client: redis.Redis, ns: Namespace, payloads: list[bytes]) -> list[str]:
    """Publish ``payloads`` and wait until they are scored; their transaction ids."""
    Publisher(redis_client, ns.stream).publish(payloads)
    wait_for(lambda: fully_drained(redis_client, ns), 120, message="the probe to be scored")
    return [orjson.loads(p)["transaction_id"] for p in payloads]


def scored_by(ns: Namespace, ids: list[str]) -> set[tuple[str, str | None]]:
    return set(ns.sql("SELECT model_version, shadow_model_version FROM transactions WHERE transaction_id = ANY(%s)", (ids,)))


def retrain(ns: Namespace, tmp_path: Path) -> str:
    result = ns.fraudd(
        "retrain", "--since", "40d", "--window", f"{WINDOW_DAYS}d", "--models-dir", str(tmp_path / "models"), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    return result.stdout


def test_retrain_promotes_only_a_better_model_workers_follow_live_and_rollback_restores(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, portfolio: SimulatedHistory
) -> None:
    shipped = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).version
    # The shipped generic model decided the team's history; the chargebacks came back since.
    Publisher(redis_client, ns.stream).publish(portfolio.payloads())
    drain(redis_client, ns, tmp_path, "--workers", "1", timeout=600)
    fraud = portfolio.transaction_id[portfolio.is_fraud].tolist()
    labels = tmp_path / "chargebacks.jsonl"
    labels.write_bytes(b"\n".join(orjson.dumps({"transaction_id": t, "label": "fraud", "source": "chargeback"}) for t in fraud))
    assert ns.fraudd("label", "--file", str(labels)).returncode == 0

    # Two supervisors keep running through every change below: nothing restarts them.
    daemons = [DaemonProcess.start(ns, tmp_path / f"{name}.log", "--workers", "1", "--consumer-id", name) for name in ("a", "b")]
    logs: list[str] = []
    try:
        # A model of the team's own portfolio beats the generic one on the newest days it did not see.
        out = retrain(ns, tmp_path)
        assert out.startswith("promoted "), out
        team = out.split()[1]
        (action, version, previous, comparison) = ns.sql(
            "SELECT action, model_version, previous_version, comparison FROM model_promotions ORDER BY id"
        )[-1]
        assert (action, version, previous) == ("retrain-promoted", team, shipped)
        assert comparison["candidate"]["recall"] >= comparison["champion"]["recall"] + comparison["margin"]
        assert comparison["candidate"]["alerts"] <= comparison["champion"]["alerts"]  # the same budget, not more alerts
        assert comparison["window"]["fraud"] >= 10 and comparison["trained_on"]["to"] < comparison["window"]["from"]
        card = (tmp_path / "models" / f"{team}.md").read_text()
        assert "## Promotion decision" in card and "Decision: promoted" in card
        # Within about a second every worker of both supervisors scores with it.
        time.sleep(1.5)
        assert scored_by(ns, probe(redis_client, ns, fresh_traffic(31))) == {(team, None)}

        # A worse model: the same history, its labels before the window shuffled (the window keeps
        # the true ones, so the comparison is honest). It is kept out, and runs in shadow.
        window_start = comparison["window"]["from"]
        before = [
            t for (t,) in ns.sql("SELECT transaction_id FROM transactions WHERE event_time < %s::timestamptz", (window_start,))
        ]
        rng = np.random.default_rng(3)
        noise = rng.choice(before, size=len(set(before) & set(fraud)), replace=False).tolist()
        ns.sql("UPDATE labels SET label = 'legit' WHERE transaction_id = ANY(%s) RETURNING 1", (before,))
        ns.sql(
            """INSERT INTO labels (transaction_id, label, reported_at) SELECT unnest(%s::text[]), 'fraud', now()
               ON CONFLICT (transaction_id) DO UPDATE SET label = 'fraud' RETURNING 1""",
            (noise,),
        )
        out = retrain(ns, tmp_path)
        assert out.startswith(f"kept {team}; "), out
        worse = out.split()[2]
        assert "does not beat the champion's" in out
        (action, version, previous, reason) = ns.sql(
            "SELECT action, model_version, previous_version, reason FROM model_promotions ORDER BY id"
        )[-1]
        assert (action, version, previous) == ("retrain-kept", worse, team) and reason in out
        assert "Decision: not promoted" in (tmp_path / "models" / f"{worse}.md").read_text()
        time.sleep(1.5)
        assert scored_by(ns, probe(redis_client, ns, fresh_traffic(32))) == {(team, worse)}

        # Rolled back by hand, audited: the generic model decides again, exactly as it did.
        result = ns.fraudd("models", "rollback", shipped, "--reason", "chargebacks up since Monday", "--by", "ops-anna")
        assert result.returncode == 0, result.stderr
        assert ns.sql("SELECT action, model_version, previous_version, actor, reason FROM model_promotions ORDER BY id")[-1] == (
            "rollback",
            shipped,
            team,
            "ops-anna",
            "chargebacks up since Monday",
        )
        time.sleep(1.5)
        # One worker from here on, so that each user's transactions are scored in event-time order
        # as offline scoring does.
        logs.append(stop(daemons.pop()))
        payloads = fresh_traffic(33)
        offline = offline_decisions(redis_client, payloads)
        probe(redis_client, ns, payloads)
        rows = ns.sql(
            "SELECT transaction_id, model_version, shadow_model_version, decision, score FROM transactions "
            "WHERE transaction_id = ANY(%s)",
            (list(offline),),
        )
        assert len(rows) == len(offline) and {(row[1], row[2]) for row in rows} == {(shipped, worse)}
        assert [row[0] for row in rows if row[3] != offline[row[0]][0]] == []
        assert max(abs(row[4] - offline[row[0]][1]) for row in rows) < 1e-6
        # A model that never decided cannot be "rolled back" to, and an unknown one cannot be promoted.
        refused = ns.fraudd("models", "rollback", worse, "--reason", "x")
        assert refused.returncode == 1 and "never decided here" in refused.stderr
        refused = ns.fraudd("models", "promote", "no-such-model", "--reason", "x", PYTHONPROFILEIMPORTTIME="1")
        assert refused.returncode == 1 and "not registered" in refused.stderr
        # Changing the champion by hand, in an incident, waits for no training library.
        assert imported(refused.stderr).isdisjoint({"lightgbm", "sklearn"})
    finally:
        logs += [stop(daemon) for daemon in daemons]
    # Both supervisors' workers followed the changes without a restart. (A worker follows a change
    # at its first read after it, so an idle one may skip a generation.)
    for log in logs:
        assert '"deployment_followed"' in log and log.count('"worker_started"') == 1, log[-3000:]


def psi(metrics_text: str, feature: str) -> float | None:
    match = re.search(rf'^fraudd_feature_psi{{feature="{feature}"}} (\S+)$', metrics_text, re.M)
    return None if match is None else float(match.group(1))


def test_feature_psi_moves_when_traffic_drifts_and_old_models_export_none(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, portfolio: SimulatedHistory
) -> None:
    cut = int(len(portfolio) * 0.5)
    history = tmp_path / "first-half.jsonl"
    history.write_bytes(b"\n".join(portfolio.take(slice(0, cut)).history_lines()) + b"\n")
    model = tmp_path / "team.onnx"
    result = ns.fraudd("train", "--history", str(history), "--out", str(model), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert FraudModel.load(model, FEATURE_NAMES).feature_bins is not None
    assert FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).feature_bins is None

    port = free_port()
    daemon = DaemonProcess.start(
        ns, tmp_path / "fraudd.log", "--workers", "1", "--model-path", str(model), "--metrics-port", str(port)
    )
    try:
        later = portfolio.take(slice(cut, cut + 12_000))
        Publisher(redis_client, ns.stream).publish(later.payloads())
        wait_for(lambda: fully_drained(redis_client, ns), 120, message="the same population to be scored")
        wait_for(lambda: psi(http_get(f"http://127.0.0.1:{port}/metrics")[1], "log_amount") is not None, 10, message="PSI")
        text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        steady = {name: psi(text, name) for name in FEATURE_NAMES}
        print("PSI, same population:", steady)
        # The message features are the population's own. Behaviour features start from an empty state
        # here (a cold start: no earlier transaction of any user), so they may honestly drift from
        # training, by how much depends on how much of the cold start the sample holds.
        assert steady["log_amount"] < 0.05 and max(steady[name] for name in MESSAGE_FEATURES) < 0.2
        assert "fraudd_score_bucket" in text

        # The same customers, amounts twenty times larger: log_amount drifts, the rest does not.
        drifted = []
        for payload in portfolio.take(slice(cut + 12_000, cut + 20_000)).payloads():
            message = orjson.loads(payload)
            message["amount"] = round(message["amount"] * 20, 2)
            drifted.append(orjson.dumps(message))
        for part in (drifted[:6_000], drifted[6_000:]):  # a second apart: PSI is published once a second
            Publisher(redis_client, ns.stream).publish(part)
            wait_for(lambda: fully_drained(redis_client, ns), 120, message="the drifted traffic to be scored")
            time.sleep(1.2)
        text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        print("PSI, amounts x20:", psi(text, "log_amount"), "count_1h:", psi(text, "count_1h"))
        assert psi(text, "log_amount") > 0.2
        assert psi(text, "count_1h") < 0.2
    finally:
        stop(daemon)

    # The shipped model was trained before bins were stored: no PSI at all.
    port = free_port()
    daemon = DaemonProcess.start(ns, tmp_path / "shipped.log", "--workers", "1", "--metrics-port", str(port))
    try:
        probe(redis_client, ns, fresh_traffic(34, 3_000))
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "fraudd_score_count" in text and "fraudd_feature_psi{" not in text
    finally:
        stop(daemon)


def test_share_of_flagged_decisions_later_labelled_fraud_by_week(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from fraudd.runtime import metrics
    from fraudd.scoring.precision import FlaggedPrecision

    Publisher(redis_client, ns.stream).publish(fresh_traffic(35, 3_000))
    drain(redis_client, ns, tmp_path, "--workers", "1")
    weeks = ns.sql(
        """SELECT to_char(date_trunc('week', event_time), 'YYYY-MM-DD'), array_agg(transaction_id ORDER BY transaction_id)
           FROM transactions WHERE decision <> 'approve' GROUP BY 1"""
    )
    assert weeks and all(len(ids) >= 4 for _week, ids in weeks)
    # A quarter of each week's alerts come back as fraud, another quarter as legitimate; the rest have no label yet.
    labels = tmp_path / "verdicts.jsonl"
    lines = []
    for _week, ids in weeks:
        quarter = len(ids) // 4
        lines += [{"transaction_id": t, "label": "fraud"} for t in ids[:quarter]]
        lines += [{"transaction_id": t, "label": "legit"} for t in ids[quarter : 2 * quarter]]
    labels.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    assert ns.fraudd("label", "--file", str(labels)).returncode == 0

    FlaggedPrecision(ns.postgres_url, ns.schema).run_once()
    for week, ids in weeks:
        quarter = len(ids) // 4
        assert metrics.flagged_fraud_share.labels(week)._value.get() == pytest.approx(quarter / len(ids))
        assert metrics.flagged_labelled.labels(week)._value.get() == 2 * quarter


def test_a_deployed_file_that_does_not_load_is_refused_and_the_running_model_kept(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from fraudd.schema import connect
    from fraudd.scoring import deployment

    shipped = FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES)
    daemon = DaemonProcess.start(ns, tmp_path / "fraudd.log", "--workers", "1")
    try:
        probe(redis_client, ns, fresh_traffic(36, 300))
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not a model")  # e.g. the models directory not mounted on this host
        with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
            deployment.register(conn, deployment.Registered("broken", broken, 0.5, 0.9, {}))
            deployment.register(conn, deployment.Registered(shipped.version, DEFAULT_MODEL, 0.5, 0.9, {}))
            deployment.deploy(conn, "broken", None, "promote", "test", "a file that does not load", replacing=shipped.version)
        time.sleep(1.5)
        assert scored_by(ns, probe(redis_client, ns, fresh_traffic(37, 300))) == {(shipped.version, None)}
        time.sleep(1.5)
        assert scored_by(ns, probe(redis_client, ns, fresh_traffic(38, 300))) == {(shipped.version, None)}
        # Once the file is there, the deployment is taken at the next read, without another command.
        broken.write_bytes(DEFAULT_MODEL.read_bytes())
        time.sleep(1.5)
        assert scored_by(ns, probe(redis_client, ns, fresh_traffic(39, 300))) == {(shipped.version, None)}
    finally:
        log = stop(daemon)
    assert log.count('"deployment_refused"') == 1 and "deployed model broken: " in log  # logged once, tried every second
    assert log.count('"deployment_followed"') == 1
