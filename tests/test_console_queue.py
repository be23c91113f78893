"""The console's SQL on the real PostgreSQL: cases from decisions, priority, concurrent claims,
leases, verdicts once, the append-only audit, and ``fraudd users``."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from fraudd.console import audit, cases, links, queue, sla
from fraudd.console.queue import FilterError, QueueFilter
from fraudd.console.server import Housekeeper
from fraudd.rulesets import store
from fraudd.schema import connect
from fraudd.settings import PostgresSettings

from .conftest import Namespace

SLA = timedelta(hours=4)
SLAS = dict.fromkeys(queue.DECISIONS, SLA)
LEASE = timedelta(minutes=30)


def stored(ns: Namespace, count: int, prefix: str, decision: str = "review", age: str = "0 minutes", score: float = 0.5) -> None:
    """``count`` scored rows as the workers' COPY leaves them, scored ``age`` ago."""
    ns.sql(
        f"""INSERT INTO transactions (transaction_id, user_id, amount, merchant, country, device_id, ip, card_id, event_time,
                                      stream_id, score, decision, reasons, model_version, scored_at)
            SELECT '{prefix}' || i, 'u' || (i %% 10), 100 + i, 'm' || (i %% 3), 'FR', 'd' || (i %% 5), '10.0.0.' || (i %% 7),
                   'c' || i, now() - interval '{age}', '1-' || i, %s, %s, ARRAY['R_TEST', 'model:amount'], 'v1',
                   clock_timestamp() - interval '{age}'
            FROM generate_series(1, %s) i RETURNING 1""",
        (score, decision, count),
    )


@pytest.fixture
def conn(ns: Namespace):
    with connect(ns.postgres_url, ns.schema, autocommit=True) as connection:
        yield connection


def test_cases_come_from_review_and_decline_decisions_once(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 6, "r", "review")
    stored(ns, 4, "d", "decline")
    stored(ns, 5, "a", "approve")
    stored(ns, 3, "h", "review", age="8 days")  # history from before the console: not cases
    assert cases.sync(conn, SLAS) == 10
    assert cases.sync(conn, SLAS) == 0
    assert dict(ns.sql("SELECT decision, count(*) FROM cases GROUP BY decision")) == {"review": 6, "decline": 4}


def test_breached_cases_come_first_then_priority(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 3, "new", score=0.9)
    stored(ns, 2, "old", score=0.1, age="5 hours")
    cases.sync(conn, SLAS)
    listed = [row["transaction_id"] for row in queue.listing(conn, QueueFilter(), SLA)]
    assert listed[:2] == ["old2", "old1"] and listed[2:] == ["new3", "new2", "new1"]  # larger amounts first
    assert queue.tally(conn, "review", SLA) | {"newest": None} == {
        "open": 5,
        "claimed": 0,
        "breached": 2,
        "resolved_24h": 0,
        "newest": None,
    }
    assert queue.counts(conn, "review")["open"] == 0  # the pages read what the housekeeping last counted
    queue.store_tallies(conn, SLAS)
    assert queue.counts(conn, "review") == queue.tally(conn, "review", SLA)
    assert queue.claim_next(conn, "alice", "review", SLA, LEASE) == "old2"


def test_a_queues_sla_changes_its_order_and_breaches_at_once(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 2, "sure", score=0.9)
    stored(ns, 1, "aged", score=0.1, age="90 minutes")
    stored(ns, 1, "dec", decision="decline", age="90 minutes")
    cases.sync(conn, SLAS)

    def listed(decision: str = "review") -> list[tuple[str, bool]]:
        slas = sla.current(conn, SLA)
        return [(row["transaction_id"], row["breached"]) for row in queue.listing(conn, QueueFilter(decision), slas[decision])]

    assert listed() == [("sure2", False), ("sure1", False), ("aged1", False)]  # 90 minutes weigh less than 0.8 of score
    with conn.transaction():
        sla.change(conn, "review", timedelta(hours=1), SLA, "dave", "127.0.0.1")
    assert sla.current(conn, SLA) == {"review": timedelta(hours=1), "decline": SLA}
    assert listed() == [("aged1", True), ("sure2", False), ("sure1", False)]
    assert listed("decline") == [("dec1", False)]  # the other queue keeps its SLA
    assert queue.counts(conn, "review")["breached"] == 1  # counted in the same transaction
    assert queue.claim_next(conn, "alice", "review", sla.current(conn, SLA)["review"], LEASE) == "aged1"
    assert ns.sql("SELECT actor, action, subject, before, after, address FROM console_audit") == [
        ("dave", "sla_changed", "review", {"sla_minutes": 240}, {"sla_minutes": 60}, "127.0.0.1")
    ]
    stored(ns, 1, "new")
    assert cases.sync(conn, sla.current(conn, SLA)) == 1
    assert cases.rerank(conn, sla.current(conn, SLA)) == 0  # a new case is ranked against its queue's SLA too
    for bad in ("0", "-5", "x", "10081", "1.5"):
        with pytest.raises(sla.SlaError):
            sla.parse_minutes(bad)


def test_twenty_concurrent_claimers_never_get_the_same_case(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 300, "c")
    cases.sync(conn, SLAS)
    claimed: list[str] = []
    start = threading.Barrier(20)

    def claimer(k: int) -> None:
        with connect(ns.postgres_url, ns.schema, autocommit=True) as mine:
            start.wait()
            while (case := queue.claim_next(mine, f"analyst{k}", "review", SLA, LEASE)) is not None:
                claimed.append(case)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 300 and len(set(claimed)) == 300
    assert ns.sql("SELECT count(DISTINCT assignee) > 1, count(*) FILTER (WHERE state = 'claimed') FROM cases") == [(True, 300)]


def test_an_expired_lease_returns_the_case_to_the_queue(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 1, "l")
    cases.sync(conn, SLAS)
    assert queue.claim_next(conn, "alice", "review", SLA, LEASE) == "l1"
    # Bob may not take a verdict on Alice's case while her lease runs.
    with conn.transaction():
        assert cases.resolve(conn, ["l1"], "bob", "fraud") == []
    ns.sql("UPDATE cases SET lease_until = now() - interval '1 second' RETURNING 1")
    Housekeeper(PostgresSettings(ns.postgres_url, ns.schema), SLA, timedelta(minutes=30)).run_once()
    assert ns.sql("SELECT state, assignee FROM cases") == [("open", None)]
    assert ns.sql("SELECT actor, action, before->>'assignee' FROM console_audit") == [("fraudd", "lease_expired", "alice")]
    assert queue.claim_next(conn, "bob", "review", SLA, LEASE) == "l1"


def test_a_case_is_resolved_once(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 2, "v")
    cases.sync(conn, SLAS)
    with conn.transaction():
        (first,) = cases.resolve(conn, ["v1"], "alice", "fraud")
    with conn.transaction():
        assert cases.resolve(conn, ["v1"], "bob", "legit") == []
    assert first.label.source == "console:alice"
    assert ns.sql("SELECT transaction_id, label, source FROM label_history") == [("v1", "fraud", "console:alice")]
    assert ns.sql("SELECT transaction_id, label FROM labels") == [("v1", "fraud")]


def test_the_audit_trail_is_append_only(ns: Namespace, conn: psycopg.Connection) -> None:
    audit.record(conn, "alice", "login", subject="alice")
    for statement in ("UPDATE console_audit SET actor = 'mallory'", "DELETE FROM console_audit", "TRUNCATE console_audit"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute(statement)
    assert ns.sql("SELECT actor FROM console_audit") == [("alice",)]
    store.audit(conn, "bob", "publish", None, note="tightened")
    lines = "".join(audit.export_csv(conn)).splitlines()
    assert lines[0] == ",".join(audit.EXPORT_COLUMNS)
    assert lines[1].startswith("console,") and ",alice,login," in lines[1]
    assert lines[2].startswith("rules,") and ",bob,publish," in lines[2] and "tightened" in lines[2]


def test_queue_filters(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 9, "f")
    cases.sync(conn, SLAS)

    def ids(**query: str) -> list[str]:
        return sorted(row["transaction_id"] for row in queue.listing(conn, QueueFilter.parse(query), SLA))

    assert ids(merchant="m1") == ["f1", "f4", "f7"]
    assert ids(amount_min="105", amount_max="107") == ["f5", "f6", "f7"]
    assert ids(reason="R_TEST") == ids() and ids(rule="R_OTHER") == []
    assert ids(score_min="0.6") == [] and ids(country="FR") == ids()
    assert ids(decision="decline") == [] and ids(breached="1") == [] and ids(older_than_minutes="60") == []
    queue.claim(conn, "f3", "alice", LEASE)
    assert ids(state="claimed", assignee="alice") == ["f3"] == ids(assignee="alice")  # whose cases: the ones they hold
    assert [row["transaction_id"] for row in queue.listing(conn, QueueFilter.parse({"sort": "amount"}), SLA)][0] == "f9"
    for bad in ({"score_min": "x"}, {"state": "gone"}, {"sort": "random"}, {"amount_min": "-1"}):
        with pytest.raises(FilterError):
            QueueFilter.parse(bad)


def test_users_command(ns: Namespace, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret-enough\n")
    assert ns.fraudd("users", "add", "ann", "--role", "analyst", "--password-file", str(password)).returncode == 0
    again = ns.fraudd("users", "add", "ann", "--role", "lead", "--password-file", str(password))
    assert again.returncode != 0 and "exists already" in again.stderr
    (tmp_path / "short").write_text("short\n")
    short = ns.fraudd("users", "add", "bo", "--role", "analyst", "--password-file", str(tmp_path / "short"))
    assert short.returncode != 0 and "at least 8 characters" in short.stderr
    stored_hash = ns.sql("SELECT password_hash FROM console_users WHERE username = 'ann'")[0][0]
    assert stored_hash.startswith("scrypt$") and "s3cret" not in stored_hash
    ns.sql("INSERT INTO console_sessions (token_hash, username, csrf_token) VALUES ('\\x00', 'ann', 't') RETURNING 1")
    assert ns.fraudd("users", "set-role", "ann", "lead").returncode == 0
    assert ns.sql("SELECT count(*) FROM console_sessions") == [(0,)]  # a role change ends the sessions
    assert ns.fraudd("users", "disable", "ann").returncode == 0
    listed = ns.fraudd("users", "list").stdout.split()
    assert listed == ["ann", "lead", "disabled"]
    assert Counter(row[0] for row in ns.sql("SELECT action FROM console_audit")) == {
        "user_added": 1,
        "role_changed": 1,
        "user_disabled": 1,
    }
    assert ns.fraudd("users", "disable", "nobody").returncode != 0
    # The last active admin can be neither demoted nor disabled; with a second admin, they can.
    assert ns.fraudd("users", "add", "root", "--role", "admin", "--password-file", str(password)).returncode == 0
    for refused in (("set-role", "root", "lead"), ("disable", "root")):
        result = ns.fraudd("users", *refused)
        assert result.returncode != 0 and "last active admin" in result.stderr
    assert ns.fraudd("users", "enable", "ann").returncode == 0
    assert ns.fraudd("users", "set-role", "ann", "admin").returncode == 0
    assert ns.fraudd("users", "disable", "root").returncode == 0
    assert ns.sql("SELECT username, role, disabled FROM console_users ORDER BY username") == [
        ("ann", "admin", False),
        ("root", "admin", True),
    ]


def test_linked_customers_share_a_device_ip_or_card(ns: Namespace, conn: psycopg.Connection) -> None:
    stored(ns, 20, "k")  # customers u0..u9; devices d0..d4, IPs 10.0.0.0..6, a card each
    assert links.sync(conn) > 0
    assert links.sync(conn) == 0  # a pass read twice changes nothing
    ns.sql("INSERT INTO labels (transaction_id, label, reported_at) VALUES ('k6', 'fraud', now()) RETURNING 1")
    mine = ns.sql("SELECT to_jsonb(t), event_time FROM transactions t WHERE transaction_id = 'k1'")[0]
    found = {row["user_id"]: row for row in links.linked(conn, *mine)}
    # k1 is u1 on d1 and 10.0.0.1: k6 (u6) shares d1, k8 (u8) shares 10.0.0.1, k11 (u1) is the same customer.
    assert found["u6"]["shared"] == ["device:d1"] and found["u6"]["fraud"] == 1
    assert found["u8"]["shared"] == ["ip:10.0.0.1"] and found["u8"]["fraud"] == 0
    assert "u1" not in found
    assert all(set(row["shared"]) <= {"device:d1", "ip:10.0.0.1", "card:c1"} for row in found.values())
