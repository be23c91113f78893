"""Operating fraudd as the README says: status for monitoring scripts, bad options, changing the
shard count, and an input stream that stays bounded whoever writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from fraudd import shard_counts
from fraudd.ingest import Publisher
from fraudd.keys import shard_streams

from .conftest import Namespace, wait_for
from .services import start, stop
from .streams import alerts, fully_drained, publish, valid_payloads

FLAG_EVERYTHING = ("--review-threshold", "0.000001")


def test_status_exit_codes_tell_down_from_behind(ns: Namespace, redis_client: redis.Redis) -> None:
    publish(redis_client, ns.stream, valid_payloads(6, "waiting"))
    behind = ns.fraudd("status", timeout=30)
    assert behind.returncode == 3, behind.stdout + behind.stderr
    assert "lag 6" in behind.stdout and "above --lag-limit 0" in behind.stdout
    assert ns.fraudd("status", "--lag-limit", "6", timeout=30).returncode == 0
    down = ns.fraudd("status", "--redis-url", "redis://127.0.0.1:1/0", timeout=30)
    assert down.returncode == 1 and "redis      DOWN" in down.stdout
    cluster_down = ns.fraudd("status", "--redis-cluster", "--shards", "4", "--redis-url", "redis://127.0.0.1:1/0", timeout=30)
    assert cluster_down.returncode == 1 and "redis      DOWN" in cluster_down.stdout, cluster_down.stderr
    assert "Traceback" not in cluster_down.stderr


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("status", "--redis-url", "http://127.0.0.1:6379"),
        ("run", "--redis-url", "redis://127.0.0.1:port/0"),
        ("ingest", "--redis-url", "postgresql://127.0.0.1:5432/x"),
        ("migrate", "--postgres-url", "mysql://fraudd:s3cret@db/fraudd"),
        ("alerts", "--postgres-url", "mysql://fraudd:s3cret@db/fraudd"),
        ("demo", "--redis-url", "redis//127.0.0.1"),
    ],
)
def test_a_bad_url_option_is_one_line_naming_it(ns: Namespace, command: str, option: str, value: str) -> None:
    result = ns.fraudd(command, option, value, timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {option} / ") and "s3cret" not in line, result.stderr


def test_changing_the_shard_count_strands_nothing_and_alerts_once(
    ns: Namespace, redis_client: redis.Redis, tmp_path: Path
) -> None:
    scored = valid_payloads(300, "before")
    publish(redis_client, ns.stream, scored)
    daemon = start(ns, tmp_path, "--workers", "1", *FLAG_EVERYTHING)
    try:
        wait_for(lambda: fully_drained(redis_client, ns, 1), 60, message="the single stream drained")
    finally:
        stop(daemon)
    assert len(alerts(redis_client, ns)) == 300

    # The producer still writes the single stream: a run on 4 shards would never read these.
    publish(redis_client, ns.stream, valid_payloads(6, "late"))
    refused = ns.fraudd("run", "--shards", "4", *FLAG_EVERYTHING, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"6 on {ns.stream} (--shards 1)" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    status = ns.fraudd("status", "--shards", "4", timeout=30)
    assert status.returncode == 3 and "stranded" in status.stdout, status.stdout

    # As the README says: finish them with the old count, then change it.
    daemon = start(ns, tmp_path, "--workers", "1", *FLAG_EVERYTHING)
    try:
        wait_for(lambda: fully_drained(redis_client, ns, 1), 60, message="the late entries scored")
    finally:
        stop(daemon)
    daemon = start(ns, tmp_path, "--workers", "2", "--shards", "4", *FLAG_EVERYTHING)
    try:
        wait_for(lambda: shard_counts.latest(redis_client, ns.stream) == 4, 30, message="the new count recorded")
        # An ingest still on the single stream is refused now that scoring reads 4 shards.
        wrong = ns.fraudd("ingest", "--workers", "1", timeout=30)
        assert wrong.returncode == 2 and "--shards 4" in wrong.stderr, wrong.stderr
        # The producer re-sends what was scored before the change (inside the dedup window) and new ones.
        Publisher(redis_client, ns.stream, 4).publish(scored + valid_payloads(40, "after"))
        wait_for(lambda: fully_drained(redis_client, ns, 4), 60, message="the shard streams drained")
    finally:
        log = stop(daemon)
    # Each re-sent transaction was recognised through the earlier count's marker, so the features
    # counted it once (and the stored decision of its first scoring was kept).
    adopted = [json.loads(line)["transactions"] for line in log.splitlines() if '"carried_over"' in line]
    assert sum(adopted) == 300, adopted
    assert ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions") == [(346, 346)]
    sent = [a["transaction_id"] for a in alerts(redis_client, ns)]
    assert len(sent) == len(set(sent)) == 346, "a transaction scored before the change was alerted again"


def test_the_scoring_supervisor_trims_what_any_producer_wrote(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    """No ingest runs: a producer of its own writes the stream; fraudd run keeps every shard bounded."""
    shards = 2
    Publisher(redis_client, ns.stream, shards).publish(valid_payloads(2000, "produced"))
    daemon = start(ns, tmp_path, "--workers", "1", "--shards", str(shards), "--retention-s", "1")
    try:
        wait_for(lambda: fully_drained(redis_client, ns, shards), 60, message="the shard streams drained")
        streams = shard_streams(ns.stream, shards)
        wait_for(lambda: all(redis_client.xlen(s) < 1000 for s in streams), 30, message="every shard stream trimmed")
    finally:
        stop(daemon)
