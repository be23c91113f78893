"""``fraudd dlq list|replay|purge`` on dead letters the daemon itself wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from fraudd.runtime.deadletters import REASON_MAX_DELIVERIES
from fraudd.scoring import decode

from .conftest import Namespace
from .services import drain
from .streams import alerts, dlq, payload, publish, valid_payloads

NOT_JSON = b"definitely not json"
NOT_OBJECT = b"[1, 2, 3]"


@pytest.fixture
def dead_letters(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> dict[str, str]:
    """The daemon's dead letters for a mix of bad entries; source entry id -> DLQ reason."""
    entries = [NOT_JSON, *valid_payloads(20, "ok"), NOT_OBJECT, None, NOT_JSON]
    ids = publish(redis_client, ns.stream, entries)
    drain(redis_client, ns, tmp_path, "--workers", "1")
    expected = {
        ids[0]: decode.REASON_NOT_JSON,
        ids[21]: decode.REASON_NOT_OBJECT,
        ids[22]: decode.REASON_NO_DATA,
        ids[23]: decode.REASON_NOT_JSON,
    }
    assert {d["source_id"].decode(): d["reason"].decode() for d in dlq(redis_client, ns)} == expected
    return expected


def dlq_ids(client: redis.Redis, ns: Namespace) -> list[str]:
    return [i.decode() for i, _ in client.xrange(ns.dlq_stream)]


def test_entry_without_data_field_is_dead_lettered_with_its_fields_and_replayed_as_it_was(
    ns: Namespace, redis_client: redis.Redis, dead_letters: dict[str, str], tmp_path: Path
) -> None:
    letter = next(d for d in dlq(redis_client, ns) if d["reason"] == decode.REASON_NO_DATA.encode())
    assert letter["data"] == b"" and letter["deliveries"] == b"1" and letter["source_stream"] == ns.stream.encode()
    assert letter["field:note"] == b"no data field"
    assert redis_client.xpending(ns.stream, ns.group)["pending"] == 0

    replayed = ns.fraudd("dlq", "replay", "--reason", decode.REASON_NO_DATA)
    assert replayed.returncode == 0, replayed.stderr
    (_id, fields), *_ = redis_client.xrevrange(ns.stream, count=1)
    assert fields == {b"note": b"no data field"}
    drain(redis_client, ns, tmp_path, "--workers", "1")
    reasons = sorted(d["reason"].decode() for d in dlq(redis_client, ns))
    assert reasons == sorted(dead_letters.values()), "the replayed entry is dead-lettered for what it is, not as invalid_json"


def test_list_shows_every_dead_letter_and_filters(ns: Namespace, dead_letters: dict[str, str]) -> None:
    listed = ns.fraudd("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4
    for source_id, reason in dead_letters.items():
        assert any(source_id in line and reason in line for line in lines), listed.stdout
    assert "4 shown, 4 in" in listed.stderr

    only = ns.fraudd("dlq", "list", "--reason", decode.REASON_NOT_JSON)
    assert len(only.stdout.splitlines()) == 2 and decode.REASON_NOT_OBJECT not in only.stdout
    assert len(ns.fraudd("dlq", "list", "--count", "1").stdout.splitlines()) == 1


def test_purge_by_id_by_reason_and_all(ns: Namespace, redis_client: redis.Redis, dead_letters: dict[str, str]) -> None:
    refused = ns.fraudd("dlq", "purge")
    assert refused.returncode != 0 and "--reason" in refused.stderr
    first = dlq_ids(redis_client, ns)[0]
    assert "purged 1 entries" in ns.fraudd("dlq", "purge", first).stdout
    assert first not in dlq_ids(redis_client, ns) and len(dlq_ids(redis_client, ns)) == 3
    assert "purged 1 entries" in ns.fraudd("dlq", "purge", "--reason", decode.REASON_NOT_OBJECT).stdout
    assert "purged 2 entries" in ns.fraudd("dlq", "purge", "--all").stdout
    assert redis_client.xlen(ns.dlq_stream) == 0


def test_replay_of_a_fixed_entry_yields_exactly_one_row(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    good = payload("replayed_1", user="replay_user", amount=77.0)
    ids = publish(redis_client, ns.stream, [good, NOT_JSON])
    redis_client.xgroup_create(ns.stream, ns.group, id="0")
    # The valid entry became poison while a dependency misbehaved (its consumers kept dying).
    redis_client.xreadgroup(ns.group, "crasher", {ns.stream: ">"}, count=1)
    redis_client.execute_command("XCLAIM", ns.stream, ns.group, "crasher", 0, ids[0], "RETRYCOUNT", 9)
    drain(
        redis_client,
        ns,
        tmp_path,
        "--workers",
        "1",
        "--claim-idle-ms",
        "300",
        "--max-deliveries",
        "3",
        "--review-threshold",
        "0.000001",
    )
    reasons = sorted(d["reason"].decode() for d in dlq(redis_client, ns))
    assert reasons == sorted([REASON_MAX_DELIVERIES, decode.REASON_NOT_JSON])
    assert ns.sql("SELECT count(*) FROM transactions")[0][0] == 0
    # An operator replays it twice (say, two people at once): still one row, one alert.
    poison_id = next(i for i, f in redis_client.xrange(ns.dlq_stream) if f[b"reason"] == b"max_deliveries")
    redis_client.xadd(ns.dlq_stream, redis_client.xrange(ns.dlq_stream, poison_id, poison_id)[0][1])

    replayed = ns.fraudd("dlq", "replay", "--reason", REASON_MAX_DELIVERIES)
    assert replayed.returncode == 0 and "replayed 2 entries" in replayed.stdout, replayed.stderr
    assert [d["reason"].decode() for d in dlq(redis_client, ns)] == [decode.REASON_NOT_JSON]
    drain(redis_client, ns, tmp_path, "--workers", "1", "--review-threshold", "0.000001")

    assert ns.sql("SELECT transaction_id, count(*) FROM transactions GROUP BY 1") == [("replayed_1", 1)]
    assert [a["transaction_id"] for a in alerts(redis_client, ns)] == ["replayed_1"]
    assert [d["reason"].decode() for d in dlq(redis_client, ns)] == [decode.REASON_NOT_JSON]
