"""Rule sets as versioned data: import, maker-checker, publish and rollback reaching running workers,
shadow sets, and `fraudd rules test` on the stored feature vectors, on the real Redis and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest
import redis

from fraudd.config import DEFAULT_RULES

from .conftest import Namespace, wait_for
from .services import DaemonProcess, stop
from .streams import fully_drained

NOW = int(time.time())
# Fires on every transaction of 300 or more: how these tests tell versions apart in the rows.
LARGE = (
    '\n[[rule]]\ncode = "R_TEST_LARGE"\nreason = "300 or more"\naction = "review"\nfeature = "amount"\nop = ">="\nvalue = 300\n'
)


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
        elif pointed_at + 1.0 <= scored_at < rolled_back_at - 0.2:
            assert version == second, (scored_at, pointed_at)
    assert {row[0] for row in rows} == {first, second}
    # A batch (one scored_at per batch) is decided by one version.
    assert ns.sql("SELECT scored_at FROM transactions GROUP BY scored_at HAVING count(DISTINCT rules_version) > 1") == []
