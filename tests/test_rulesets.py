"""Rule sets as versioned data: import, maker-checker, publish and rollback reaching running workers,
shadow sets, and `fraudd rules test` on the stored feature vectors, on the real Redis and PostgreSQL."""

from __future__ import annotations

import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from bench.rules_backtest import synthetic
from fraudd.ingest import Publisher
from fraudd.keys import Keys, shard_stream
from fraudd.rulesets import backtest
from fraudd.schema import connect
from fraudd.scoring import vectors
from fraudd.scoring.rules import Rules
from fraudd.scoring.settings import DEFAULT_RULES

from .conftest import Namespace, migrated_namespace, wait_for
from .services import DaemonProcess, drain, stop
from .streams import fully_drained

NOW = int(time.time())
# Fires on every transaction of 300 or more: how these tests tell versions apart in the rows.
LARGE = (
    '\n[[rule]]\ncode = "R_TEST_LARGE"\nreason = "300 or more"\naction = "review"\nfeature = "amount"\nop = ">="\nvalue = 300\n'
)


@pytest.fixture
def second_ns(redis_client: redis.Redis) -> Iterator[Namespace]:
    yield from migrated_namespace(redis_client)


def rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"rules-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


def rules(ns: Namespace, *args: str, actor: str = "alice") -> str:
    result = (
        ns.fraudd("rules", *args, "--actor", actor)
        if args[0] not in ("export", "list", "diff", "report")
        else ns.fraudd("rules", *args)
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def payloads(count: int, prefix: str) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "transaction_id": f"{prefix}_{i}",
                "user_id": f"user_{i % 300}",
                "amount": round(5 + (i * 7.31) % 600, 2),
                "merchant": ("Amazon", "Walmart", "Shell", "Uber", "Steam")[i % 5],
                "timestamp": NOW - 3600 + i % 3600,
            }
        )
        for i in range(count)
    ]


def produce(client: redis.Redis, ns: Namespace, items: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for payload in items:
        pipe.xadd(ns.stream, {"data": payload})
    pipe.execute()


def test_invalid_rule_is_refused_naming_it(ns: Namespace, tmp_path: Path) -> None:
    bad = rules_file(tmp_path, DEFAULT_RULES.read_text() + LARGE.replace('"amount"', '"amount_typo"'))
    result = ns.fraudd("rules", "import", str(bad), "--actor", "alice")
    assert result.returncode != 0
    assert "R_TEST_LARGE" in result.stderr and "unknown feature 'amount_typo'" in result.stderr
    assert ns.sql("SELECT count(*) FROM rule_sets") == [(0,)]


def test_maker_checker_publish_rollback_and_audit(ns: Namespace, tmp_path: Path) -> None:
    first = int(rules(ns, "import", str(DEFAULT_RULES), actor="alice"))
    second = int(rules(ns, "import", str(rules_file(tmp_path, DEFAULT_RULES.read_text() + LARGE)), actor="alice"))
    assert second == first + 1

    refused = ns.fraudd("rules", "publish", str(first), "--actor", "alice")
    assert refused.returncode != 0 and "maker-checker" in refused.stderr
    rules(ns, "publish", str(first), actor="bob")
    rules(ns, "publish", str(second), "--allow-self-approve", actor="alice")
    assert dict(ns.sql("SELECT version, status FROM rule_sets")) == {first: "retired", second: "live"}
    assert "+ R_TEST_LARGE" in rules(ns, "diff", str(first), str(second))
    assert rules(ns, "export", str(second)) == DEFAULT_RULES.read_text() + LARGE

    never_live = int(rules(ns, "import", str(DEFAULT_RULES), actor="carol"))
    refused = ns.fraudd("rules", "rollback", str(never_live), "--actor", "bob")
    assert refused.returncode != 0 and "never live" in refused.stderr
    rules(ns, "rollback", str(first), actor="alice")  # checked when it was first published
    assert ns.sql("SELECT version FROM rule_sets WHERE status = 'live'") == [(first,)]

    audit = ns.sql(
        "SELECT actor, action, version, detail->>'self_approved' FROM rules_audit WHERE action <> 'import' ORDER BY id"
    )
    assert audit == [
        ("alice", "refused", first, None),  # her own version
        ("bob", "publish", first, "false"),
        ("alice", "publish", second, "true"),
        ("alice", "rollback", first, "true"),
    ]
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        ns.sql("DELETE FROM rules_audit")
    with pytest.raises(psycopg.errors.RaiseException, match="immutable"):
        ns.sql("UPDATE rule_sets SET source = '' WHERE version = %s", (first,))


def versions_of(ns: Namespace, since: float = 0.0) -> list[tuple]:
    return ns.sql(
        """SELECT rules_version, extract(epoch FROM scored_at)::float8, amount, 'R_TEST_LARGE' = ANY(reasons), scored_at
           FROM transactions WHERE scored_at >= to_timestamp(%s)""",
        (since,),
    )


def test_publish_reaches_every_worker_of_two_supervisors_within_a_second_and_rollback_restores(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    first = rules(ns, "import", str(DEFAULT_RULES)).strip()
    rules(ns, "publish", first, actor="bob")
    second = rules(ns, "import", str(rules_file(tmp_path, DEFAULT_RULES.read_text() + LARGE))).strip()
    supervisors = [
        DaemonProcess.start(ns, tmp_path / f"{name}.log", "--workers", "2", "--batch-size", "50", CONSUMER_ID=name)
        for name in ("north", "south")
    ]
    sent = 0

    def send_for(seconds: float) -> None:
        nonlocal sent
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            produce(redis_client, ns, payloads(40, f"p{sent}"))
            sent += 1
            time.sleep(0.02)

    try:
        send_for(2.0)
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] > 0, 30, message="first decisions")
        published_at = time.time()
        rules(ns, "publish", second, actor="bob")
        pointed_at = time.time()
        send_for(3.0)
        rollback_started = time.time()
        rules(ns, "rollback", first, actor="carol")
        rolled_back_at = time.time()
        send_for(3.0)
        wait_for(lambda: fully_drained(redis_client, ns), 60, message="the stream to be drained")
    finally:
        for daemon in supervisors:
            stop(daemon)

    rows = versions_of(ns)
    assert len(rows) == sent * 40
    for version, scored_at, amount, large, _ in rows:
        # Every row is decided wholly by the version it records.
        assert large == (version == second and amount >= 300)
        if scored_at < published_at or scored_at >= rolled_back_at + 1.0:
            assert version == first, (scored_at, published_at, rolled_back_at)
        elif pointed_at + 1.0 <= scored_at < rollback_started:
            assert version == second, (scored_at, pointed_at)
    assert {row[0] for row in rows} == {first, second}
    # A batch (one scored_at per batch) is decided by one version.
    assert ns.sql("SELECT scored_at FROM transactions GROUP BY scored_at HAVING count(DISTINCT rules_version) > 1") == []


def test_backtest_equals_live_and_shadow_decides_nothing(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path, second_ns: Namespace
) -> None:
    """The same traffic through two pipelines: ``ns`` decides with the default rules and runs the
    candidate in shadow, ``second_ns`` decides with the candidate. `fraudd rules test` of the
    candidate on ``ns``'s stored vectors, and its shadow report, must equal what ``second_ns`` decided."""
    candidate = rules_file(tmp_path, DEFAULT_RULES.read_text() + LARGE)
    live = rules(ns, "import", str(DEFAULT_RULES)).strip()
    rules(ns, "publish", live, actor="bob")
    shadow = rules(ns, "import", str(candidate)).strip()
    rules(ns, "shadow", shadow, actor="bob")
    rules(second_ns, "publish", rules(second_ns, "import", str(candidate)).strip(), actor="bob")
    traffic = payloads(3000, "same")
    for namespace in (ns, second_ns):
        produce(redis_client, namespace, traffic)
        drain(redis_client, namespace, tmp_path, "--workers", "1")

    # Shadow: stored beside every row, never acting.
    assert ns.sql("SELECT count(*) FROM transactions WHERE 'R_TEST_LARGE' = ANY(reasons) OR rules_version <> %s", (live,)) == [
        (0,)
    ]
    assert ns.sql("SELECT DISTINCT shadow_rules_version FROM transactions") == [(shadow,)]
    assert ns.sql("SELECT count(*) FROM transactions WHERE shadow_rules_decision <> decision")[0][0] > 0
    alerted = {orjson.loads(f[b"data"])["transaction_id"] for _, f in redis_client.xrange(ns.fraud_stream)}
    assert alerted == {t for (t,) in ns.sql("SELECT transaction_id FROM transactions WHERE decision <> 'approve'")}

    # What the second pipeline decided, by (first pipeline's decision -> second's).
    pairs = ns.sql(
        f"""SELECT a.decision || '->' || b.decision, count(*) FROM transactions a
            JOIN {second_ns.schema}.transactions b USING (transaction_id)
            WHERE a.decision <> b.decision GROUP BY 1"""
    )
    decided = dict(second_ns.sql("SELECT decision, count(*) FROM transactions GROUP BY decision"))
    assert pairs, "the candidate changes some decisions"
    ns.sql(
        """INSERT INTO labels (transaction_id, label, reported_at)
           SELECT transaction_id, CASE WHEN amount >= 250 THEN 'fraud' ELSE 'legit' END, now()
           FROM transactions WHERE right(transaction_id, 1) IN ('1', '2', '3') RETURNING transaction_id"""
    )
    (candidate_recall, candidate_precision), (live_recall, live_precision) = (
        ns.sql(
            f"""SELECT round(count(*) FILTER (WHERE l.label = 'fraud' AND t.decision <> 'approve')::numeric
                             / nullif(count(*) FILTER (WHERE l.label = 'fraud'), 0), 4)::float8,
                       round(count(*) FILTER (WHERE l.label = 'fraud' AND t.decision <> 'approve')::numeric
                             / nullif(count(*) FILTER (WHERE t.decision <> 'approve'), 0), 4)::float8
                FROM {schema}.transactions t JOIN labels l USING (transaction_id)"""
        )[0]
        for schema in (second_ns.schema, ns.schema)
    )

    table = rules(ns, "test", shadow, "--since", "2h")  # for people
    assert "extra cases per day" in table and "R_TEST_LARGE" in table and "approve->review" in table
    for report in (
        orjson.loads(rules(ns, "test", str(candidate), "--since", "2h", "--json")),
        orjson.loads(rules(ns, "test", shadow, "--since", "2h", "--json")),
        orjson.loads(rules(ns, "report", shadow, "--since", "2h", "--json")),
    ):
        assert report["transactions"] == 3000
        assert report["changed"] == dict(pairs)
        assert {k: v for k, v in report["decisions"]["candidate"].items() if v} == decided
        extra = report["decisions"]["candidate"]["review"] - report["decisions"]["live"]["review"]
        assert report["extra_cases_per_day"] == extra  # the traffic spans less than a day
        assert report["recall"] == {"live": live_recall, "candidate": candidate_recall}
        assert report["precision"] == {"live": live_precision, "candidate": candidate_precision}
        for pair, ids in report["samples"].items():
            assert ids and all(
                ns.sql(
                    f"SELECT a.decision || '->' || b.decision FROM transactions a JOIN {second_ns.schema}.transactions b "
                    "USING (transaction_id) WHERE transaction_id = %s",
                    (txid,),
                )
                == [(pair,)]
                for txid in ids
            )


def test_publish_reaches_the_workers_of_every_shard_on_a_redis_cluster(
    cluster_ns: Namespace, cluster_client: RedisCluster, tmp_path: Path
) -> None:
    ns, shards = cluster_ns, 3
    first = rules(ns, "import", str(DEFAULT_RULES)).strip()
    rules(ns, "publish", first, "--shards", str(shards), actor="bob")
    second = rules(ns, "import", str(rules_file(tmp_path, DEFAULT_RULES.read_text() + LARGE))).strip()
    publisher = Publisher(cluster_client, ns.stream, shards)
    daemon = DaemonProcess.start(ns, tmp_path / "fraudd.log", "--workers", "2", "--shards", str(shards))
    try:
        publisher.publish(payloads(600, "before"))
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] == 600, 60, message="the first decisions")
        rules(ns, "publish", second, "--shards", str(shards), actor="bob")
        time.sleep(1.0)
        publisher.publish(payloads(600, "after"))
        wait_for(lambda: ns.sql("SELECT count(*) FROM transactions")[0][0] == 1200, 60, message="the later decisions")
    finally:
        stop(daemon)
    by_version = dict(
        ns.sql("SELECT split_part(transaction_id, '_', 1) || ':' || rules_version, count(*) FROM transactions GROUP BY 1")
    )
    assert by_version == {f"before:{first}": 600, f"after:{second}": 600}
    # Every shard's copy of the pointer lives in that shard's slot and names the live set.
    for k in range(shards):
        stream = shard_stream(ns.stream, shards, k)
        assert cluster_client.get(Keys(stream, stream, stream).rules) == f"{second}|".encode()


def read_window(ns: Namespace, since_s: float) -> backtest.Stored:
    """Every record of the window, its chunks joined."""
    now = time.time()
    parts = list(backtest.chunks(ns.postgres_url, ns.schema, now - since_s, float("inf")))
    return backtest.Stored(
        *(np.concatenate([getattr(part, name) for part in parts]) for name in backtest.Stored.__dataclass_fields__)
    )


def store_decisions(ns: Namespace, n: int, seed: int) -> None:
    """``n`` decisions of the last two hours with plausible feature vectors, a tenth of them labelled."""
    rng = np.random.default_rng(seed)
    vec, amount, _ = synthetic(rng, n, NOW * 1000)
    column = {name: j for j, name in enumerate(vectors.VECTOR_COLUMNS)}
    vec[:, column[vectors.MODEL_DECISION]] = rng.choice(3, n, p=[0.8, 0.15, 0.05])
    decision = rng.choice(["approve", "review", "decline"], n, p=[0.7, 0.2, 0.1])
    event_ms = (NOW - rng.integers(0, 7200, n)) * 1000
    times = [f"{t}+00" for t in np.datetime_as_string(event_ms.astype("datetime64[ms]"), unit="ms").tolist()]
    rows = zip(range(n), amount.tolist(), times, decision.tolist(), vectors.copy_text(vec))
    text = "".join(f"bt_{i}\tu\t{a!r}\tm\t{t}\t1-{i}\t0.1\t{d}\tv\t{v}\n" for i, a, t, d, v in rows)
    with connect(ns.postgres_url, ns.schema) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY transactions (transaction_id, user_id, amount, merchant, event_time, stream_id, score, decision,"
            " model_version, features) FROM STDIN"
        ) as copy:
            copy.write(text)
    ns.sql(
        """INSERT INTO labels (transaction_id, label, reported_at)
           SELECT transaction_id, CASE WHEN amount >= 100 THEN 'fraud' ELSE 'legit' END, now()
           FROM transactions WHERE right(transaction_id, 1) = '7' RETURNING 1"""
    )


def test_backtest_holds_a_chunk_at_a_time_and_reports_as_one_read_of_the_window(
    ns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However the window is chunked, the report is the same; what the test holds is a chunk's
    worth, not the window's records."""
    n, chunk = 80_000, 500
    store_decisions(ns, n, seed=11)
    candidate = Rules.from_bytes(DEFAULT_RULES.read_bytes() + LARGE.encode(), version="candidate")
    seen: list[int] = []
    evaluate = backtest.evaluate

    def counted(stored: backtest.Stored, rules: Rules) -> tuple[np.ndarray, np.ndarray]:
        seen.append(len(stored))
        return evaluate(stored, rules)

    monkeypatch.setattr(backtest, "evaluate", counted)
    monkeypatch.setattr(backtest, "CHUNK_ROWS", chunk)
    tracemalloc.start()
    try:
        chunked = backtest.test(ns.postgres_url, ns.schema, candidate, 3 * 3600, 5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(seen) == n and max(seen) == chunk
    assert peak < n * backtest.RECORD_BYTES / 8, f"held {peak} bytes at the peak"

    monkeypatch.setattr(backtest, "CHUNK_ROWS", n)  # each part read whole
    seen.clear()
    whole = backtest.test(ns.postgres_url, ns.schema, candidate, 3 * 3600, 5.0)
    assert len(seen) == backtest.PARTS
    assert chunked == whole
    assert chunked["transactions"] == n and chunked["labelled"] == n // 10 and chunked["top_rules"]
    assert set(chunked["recall"]) == set(chunked["precision"]) == {"live", "candidate"}
    assert all(len(ids) == backtest.SAMPLES for ids in chunked["samples"].values())


def test_vectors_stored_before_the_card_blocklist_stay_readable(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    """Rows whose vector has the first stored layout (before `blocked_card` was appended) are read by
    the backtest with the card as not blocked and every other column as stored."""
    blocked = ns.fraudd("rules", "block", "card", "card-x", "--reason", "stolen")
    assert blocked.returncode == 0, blocked.stderr
    produce(redis_client, ns, [orjson.dumps(dict(orjson.loads(p), card_id="card-x")) for p in payloads(200, "card")])
    drain(redis_client, ns, tmp_path, "--workers", "1")
    assert ns.sql("SELECT count(*) FROM transactions WHERE decision = 'decline' AND 'R_BLOCKED_CARD' = ANY(reasons)") == [(200,)]
    today = read_window(ns, 7200)
    first_layout = vectors.LAYOUT_BYTES[0]
    ns.sql(
        "UPDATE transactions SET features = substring(features FROM 1 FOR %s) WHERE right(transaction_id, 1) < '5' RETURNING 1",
        (first_layout,),
    )
    read = read_window(ns, 7200)
    assert len(read) == len(today) == 200
    by_id = {txid: row for row, txid in enumerate(read.transaction_id.tolist())}
    order = [by_id[txid] for txid in today.transaction_id.tolist()]
    old = np.array([txid.rstrip(b"\0")[-1:] < b"5" for txid in today.transaction_id.tolist()])
    card = vectors.VECTOR_COLUMNS.index("blocked_card")
    assert (read.vectors[order][:, card] == np.where(old, 0.0, 1.0)).all()
    np.testing.assert_array_equal(read.vectors[order][:, :card], today.vectors[:, :card])
    decisions, _ = backtest.evaluate(read, Rules.load(DEFAULT_RULES))
    assert (decisions[order][~old] == 2).all() and (decisions[order][old] < 2).any()


def test_where_the_console_has_users_only_an_active_lead_or_admin_publishes(ns: Namespace, tmp_path: Path) -> None:
    """``--actor`` is checked against the console's users by the function the rules page calls."""
    password = tmp_path / "password"
    password.write_text("correct horse battery\n")
    for name, role in (("lena", "lead"), ("alice", "analyst"), ("olga", "lead")):
        assert ns.fraudd("users", "add", name, "--role", role, "--password-file", str(password)).returncode == 0
    assert ns.fraudd("users", "disable", "olga").returncode == 0
    version = rules(ns, "import", str(DEFAULT_RULES), actor="alice").strip()
    for actor in ("alice", "mallory", "olga"):
        refused = ns.fraudd("rules", "publish", version, "--actor", actor)
        assert refused.returncode != 0 and f"{actor} is not an active lead or admin" in refused.stderr
    refused = ns.fraudd("rules", "shadow", version, "--actor", "alice")
    assert refused.returncode != 0 and "not an active lead or admin" in refused.stderr
    rules(ns, "publish", version, actor="lena")
    assert ns.sql("SELECT actor, action, detail->>'refused' FROM rules_audit WHERE action <> 'import' ORDER BY id") == [
        ("alice", "refused", "publish"),
        ("mallory", "refused", "publish"),
        ("olga", "refused", "publish"),
        ("alice", "refused", "shadow"),
        ("lena", "publish", None),
    ]


def test_block_and_unblock_edit_every_shard_and_are_audited(ns: Namespace, redis_client: redis.Redis) -> None:
    rules(ns, "block", "device", "dev-9", "--reason", "mule ring", "--shards", "2", actor="carol")
    rules(ns, "block", "device", "dev-9", "--reason", "mule ring", "--shards", "2", actor="carol")
    keys = [Keys(shard_stream(ns.stream, 2, k), "", "").blocklist("device") for k in range(2)]
    assert [redis_client.sismember(key, "dev-9") for key in keys] == [True, True]
    rules(ns, "block", "device", "dev-9", "--remove", "--reason", "cleared by the bank", "--shards", "2", actor="dave")
    assert [redis_client.sismember(key, "dev-9") for key in keys] == [False, False]
    assert ns.sql(
        """SELECT actor, action, detail->>'value', detail->>'reason', detail->'before'->>'blocked', detail->'after'->>'blocked'
           FROM rules_audit ORDER BY id"""
    ) == [
        ("carol", "block", "dev-9", "mule ring", "false", "true"),
        ("carol", "block", "dev-9", "mule ring", "true", "true"),
        ("dave", "unblock", "dev-9", "cleared by the bank", "true", "false"),
    ]


def test_precision_per_rule_once_labelled(ns: Namespace, tmp_path: Path) -> None:
    """Ten decisions as the workers store them, R_PRECISION_A fired on all and R_PRECISION_B on the
    first four; three are labelled fraud and three legit: A's precision is 3/6, B's 3/4."""
    from prometheus_client import REGISTRY, generate_latest

    from fraudd.scoring.precision import FlaggedPrecision

    ns.sql(
        """INSERT INTO transactions (transaction_id, user_id, amount, merchant, event_time, stream_id, score, decision,
                                     reasons, model_version)
           SELECT 'prec' || i, 'u' || i, 100, 'm', now() - interval '1 hour', '1-' || i, 0.5, 'review',
                  CASE WHEN i <= 4 THEN ARRAY['R_PRECISION_A', 'R_PRECISION_B', 'model:amount']
                       ELSE ARRAY['R_PRECISION_A', 'model:amount'] END, 'v1'
           FROM generate_series(1, 10) i RETURNING 1"""
    )
    labels = tmp_path / "verdicts.jsonl"
    labels.write_bytes(
        b"\n".join(orjson.dumps({"transaction_id": f"prec{i}", "label": "fraud" if i <= 3 else "legit"}) for i in range(1, 7))
    )
    assert ns.fraudd("label", "--file", str(labels)).returncode == 0

    FlaggedPrecision(ns.postgres_url, ns.schema).run_once()
    exposed = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in generate_latest(REGISTRY).decode().splitlines()
        if line.startswith(("fraudd_rule_precision{", "fraudd_rule_labelled_hits{"))
    }
    assert exposed['fraudd_rule_precision{rule="R_PRECISION_A"}'] == pytest.approx(3 / 6)
    assert exposed['fraudd_rule_precision{rule="R_PRECISION_B"}'] == pytest.approx(3 / 4)
    assert exposed['fraudd_rule_labelled_hits{rule="R_PRECISION_A"}'] == 6
    assert exposed['fraudd_rule_labelled_hits{rule="R_PRECISION_B"}'] == 4
    assert not any("model:" in name for name in exposed)  # the model's reasons are no rules
