"""``fraudd alerts`` as operators run it: killed again and again while alerts flow, through a
PostgreSQL crash (with /metrics on), keeping the fraud stream and the delivery log bounded, and
refusing a bad channels file at start-up."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis

from .alerting import SECRET, SMTP_PASSWORD, SMTP_USER, Failures, HttpReceiver, SmtpServer, webhook_channel
from .conftest import FRAUDD, Namespace, wait_for, worker_pids
from .services import PostgresServer, RedisServer, alive, dedicated_namespace, free_port
from .test_alerts import alert, write_config

ALERTS = 5_000


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


def start_alerts(ns: Namespace, config: Path, log_path: Path, *args: str, from_beginning: bool = True) -> subprocess.Popen:
    """``fraudd alerts``, by default ``--from-beginning``: most tests publish alerts while it starts."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [FRAUDD, "alerts", "--config", str(config), *(["--from-beginning"] if from_beginning else []), *args],
            stdout=log,
            stderr=log,
            env=ns.env(FRAUDD_WEBHOOK_SECRET=SECRET, FRAUDD_CLAIM_IDLE_MS="1000", FRAUDD_SMTP_PASSWORD=SMTP_PASSWORD),
            start_new_session=True,
        )


def stop_alerts(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)


def webhook_config(tmp_path: Path, receiver: HttpReceiver, extra: str = "") -> Path:
    return write_config(
        tmp_path,
        f"""
{webhook_channel(receiver.url("/hook"), "ops-webhook", "FRAUDD_WEBHOOK_SECRET")}
{extra}
""",
    )


def xadd_alerts(client: redis.Redis, ns: Namespace, txids: list[str]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for txid in txids:
            pipe.xadd(ns.fraud_stream, {"data": orjson.dumps(alert(txid))})
        pipe.execute()


def test_sigkilled_repeatedly_every_alert_arrives_once(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = webhook_config(tmp_path, receiver, "timeout_s = 1")
    log_path = tmp_path / "alerts.log"
    invalid = [b"not json", b'{"no_transaction_id": 1}']

    def produce() -> None:
        for start in range(0, ALERTS, 250):
            with redis_client.pipeline(transaction=False) as pipe:
                for i in range(start, start + 250):
                    pipe.xadd(ns.fraud_stream, {"data": orjson.dumps(alert(f"tx_{i}"))})
                if start == 2500:
                    for payload in invalid:
                        pipe.xadd(ns.fraud_stream, {"data": payload})
                pipe.execute()
            time.sleep(0.1)

    producer = threading.Thread(target=produce)
    daemon = start_alerts(ns, config, log_path, "--workers", "2", "--batch-size", "200")
    rng = random.Random(7)
    try:
        producer.start()
        kills = 0
        while producer.is_alive() or kills < 6:
            time.sleep(rng.uniform(0.3, 0.8))
            if kills == 3:
                # The whole service at once: the supervisor and both workers.
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(10)
                daemon = start_alerts(ns, config, log_path, "--workers", "2", "--batch-size", "200")
            else:
                pids = worker_pids(daemon.pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
        producer.join()
        # Deliveries claimed by a killed worker are due again when their lease (2 × timeout + 5 s) ends.
        wait_for(lambda: len(receiver.accepted) == ALERTS, 90, interval=0.5, message="every alert at the receiver")
        wait_for(
            lambda: ns.sql("SELECT count(*) FROM alert_deliveries WHERE status = 'delivered'")[0][0] == ALERTS,
            30,
            message="every delivery recorded",
        )
        wait_for(lambda: redis_client.xpending(ns.fraud_stream, "fraudd-alerts")["pending"] == 0, 30, message="all acked")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert '"worker_crashed"' not in log, log[-3000:]

    # Each alert accepted once under its webhook-id; a repeat (a kill between sending and recording)
    # carried the same id, so the receiver dropped it. Only what a killed worker held claimed can
    # repeat: at most its prefetch (8 rounds of 64) per worker per kill.
    assert sorted(receiver.accepted) == sorted(f"tx_{i}:ops-webhook" for i in range(ALERTS))
    assert all(body["transaction_id"] + ":ops-webhook" == webhook_id for webhook_id, body in receiver.accepted.items())
    rows = ns.sql("SELECT status, count(*), min(attempts) FROM alert_deliveries GROUP BY status")
    assert rows == [("delivered", ALERTS, 1)], rows
    assert sum(receiver.repeats.values()) <= kills * 2 * 8 * 64, sum(receiver.repeats.values())

    letters = [{k.decode(): v for k, v in fields.items()} for _id, fields in redis_client.xrange(ns.dlq_stream)]
    assert sorted(letter["data"] for letter in letters) == sorted(invalid)
    assert {letter["reason"] for letter in letters} == {b"invalid_alert"}


def test_postgres_down_alerts_wait_then_each_arrives_once(
    dedicated_redis: RedisServer,  # noqa: F811
    dedicated_postgres: PostgresServer,  # noqa: F811
    receiver: HttpReceiver,
    tmp_path: Path,
) -> None:
    ns = dedicated_namespace(dedicated_redis, dedicated_postgres.url)
    client = dedicated_redis.client()
    config = webhook_config(tmp_path, receiver, "timeout_s = 1")

    def publish(prefix: str, count: int) -> None:
        with client.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.xadd(ns.fraud_stream, {"data": orjson.dumps(alert(f"{prefix}_{i}"))})
            pipe.execute()

    log_path = tmp_path / "alerts.log"
    metrics_port = free_port()
    daemon = start_alerts(ns, config, log_path, "--workers", "2", "--batch-size", "100", "--metrics-port", str(metrics_port))
    try:
        publish("before", 300)
        wait_for(lambda: len(receiver.accepted) == 300, 60, message="the first alerts")
        counted = (
            'fraudd_alert_deliveries_total{channel="ops-webhook",outcome="delivered"} 300.0',
            'fraudd_alert_delivery_latency_seconds_count{channel="ops-webhook"} 300.0',
        )
        wait_for(
            lambda: all(line in _get(metrics_port, "/metrics") for line in counted),
            20,
            message="the deliveries counted in /metrics",
        )
        dedicated_postgres.stop("immediate")
        try:
            publish("during", 300)
            time.sleep(3.0)
            # Nothing is sent before it is recorded, so nothing of what came during the outage.
            assert len(receiver.accepted) == 300
            assert daemon.poll() is None
        finally:
            dedicated_postgres.start()
        wait_for(lambda: len(receiver.accepted) == 600, 60, message="the alerts after PostgreSQL came back")
        wait_for(
            lambda: ns.sql("SELECT count(*) FROM alert_deliveries WHERE status = 'delivered'")[0][0] == 600,
            30,
            message="every delivery recorded",
        )
        wait_for(lambda: client.xpending(ns.fraud_stream, "fraudd-alerts")["pending"] == 0, 30, message="all acked")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert '"outage"' in log and '"recovered"' in log, log[-3000:]
    assert '"worker_died"' not in log and '"worker_crashed"' not in log, log[-3000:]
    # A crash of PostgreSQL may take the last outcomes written before it (they do not wait for the
    # WAL flush): those deliveries are made again, under the same webhook-id, and dropped by the
    # receiver. Nothing sent after the outage is repeated.
    assert all(webhook_id.startswith("before_") for webhook_id in receiver.repeats), receiver.repeats
    assert sorted(receiver.accepted) == sorted(f"{p}_{i}:ops-webhook" for p in ("before", "during") for i in range(300))
    assert client.xlen(ns.dlq_stream) == 0


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def test_the_fraud_stream_and_the_delivery_log_stay_bounded(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = webhook_config(tmp_path, receiver)
    with redis_client.pipeline(transaction=False) as pipe:
        for i in range(300):
            pipe.xadd(ns.fraud_stream, {"data": orjson.dumps(alert(f"tx_{i}"))})
        pipe.execute()
    redis_client.xgroup_create(ns.fraud_stream, "team-audit", id="0")  # another reader, slower
    # Rows of long ago: settled ones go, one still to send (a channel since removed) stays.
    ns.sql("""INSERT INTO alert_deliveries (transaction_id, channel, status, stream_id, alert, created_at, next_attempt_at)
              SELECT 'old_' || s, 'retired', s, '1-0', '{}', now() - interval '200 days', now() + interval '1 year'
              FROM unnest(ARRAY['delivered', 'failed', 'pending']) AS s RETURNING status""")
    log_path = tmp_path / "alerts.log"
    daemon = start_alerts(ns, config, log_path, "--workers", "1", "--fraud-retention-s", "1", "--deliveries-retention-days", "90")
    try:
        wait_for(lambda: len(receiver.accepted) == 300, 30, message="every alert delivered")
        wait_for(
            lambda: ns.sql("SELECT status FROM alert_deliveries WHERE left(transaction_id, 4) = 'old_'") == [("pending",)],
            30,
            message="the old settled rows purged",
        )
        wait_for(lambda: redis_client.xpending(ns.fraud_stream, "fraudd-alerts")["pending"] == 0, 30, message="all acked")
        time.sleep(6)  # a housekeeping round after the last ack: the audit group has read nothing yet
        assert redis_client.xlen(ns.fraud_stream) == 300
        redis_client.xreadgroup("team-audit", "auditor", {ns.fraud_stream: ">"})
        redis_client.xack(ns.fraud_stream, "team-audit", *[i for i, _f in redis_client.xrange(ns.fraud_stream)])
        # Approximate trimming drops whole stream nodes (100 entries): the newest node stays.
        wait_for(lambda: redis_client.xlen(ns.fraud_stream) <= 100, 20, message="the acked entries trimmed")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert daemon.returncode == 0, log_path.read_text()[-3000:]
    assert '"deliveries_purged"' in log_path.read_text()
    assert ns.sql("SELECT count(*) FROM alert_deliveries WHERE status = 'delivered'") == [(300,)]


def test_a_bad_channels_file_stops_start_up_with_one_line(ns: Namespace, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        '[[channels]]\nname = "ops"\nkind = "webhook"\nurl = "https://127.0.0.1:9/hook"\n'
        'secret_env = "FRAUDD_TEST_UNSET_SECRET"\n',
    )
    result = ns.fraudd("alerts", "--config", str(config), timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        (
            f"Error: --config / FRAUDD_ALERTS_CONFIG: {config}: channels[0] (ops).secret_env: "
            "environment variable FRAUDD_TEST_UNSET_SECRET is not set"
        )
    ], result.stderr


def test_an_id_no_channel_can_send_is_dead_lettered_and_the_worker_lives_on(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    with SmtpServer(tmp_path) as smtp:
        config = webhook_config(
            tmp_path,
            receiver,
            f"""retry_base_s = 0.05

[[channels]]
name = "analysts"
kind = "email"
host = "127.0.0.1"
port = {smtp.port}
ca_file = "{smtp.cert}"
username = "{SMTP_USER}"
password_env = "FRAUDD_SMTP_PASSWORD"
from = "fraudd@bank.example"
to = ["analysts@bank.example"]
retry_base_s = 0.05
""",
        )
        log_path = tmp_path / "alerts.log"
        daemon = start_alerts(ns, config, log_path, "--workers", "1", "--max-attempts", "3")
        try:
            # Written straight onto the fraud stream: a line break in the id cannot be a webhook
            # header, an e-mail Subject or a Message-ID.
            xadd_alerts(redis_client, ns, ["tx_before", "tx_bad\r\nX-Injected: 1", "tx_after"])
            wait_for(lambda: redis_client.xlen(ns.dlq_stream) == 2, 30, message="the bad alert dead-lettered on both channels")
            wait_for(lambda: len(receiver.accepted) == 2 and len(smtp.mailbox.messages) == 2, 30, message="the good ones")
            xadd_alerts(redis_client, ns, ["tx_later"])
            wait_for(lambda: len(receiver.accepted) == 3, 30, message="an alert after them")
        finally:
            stop_alerts(daemon)
    log = log_path.read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert '"worker_crashed"' not in log and '"worker_died"' not in log, log[-3000:]
    assert sorted(receiver.accepted) == ["tx_after:ops-webhook", "tx_before:ops-webhook", "tx_later:ops-webhook"]
    letters = {f[b"channel"].decode(): f for _i, f in redis_client.xrange(ns.dlq_stream)}
    assert sorted(letters) == ["analysts", "ops-webhook"]
    for letter in letters.values():
        assert letter[b"reason"] == b"alert_undeliverable" and letter[b"attempts"] == b"3", letter
        assert b"ValueError" in letter[b"detail"], letter
    rows = ns.sql(
        "SELECT channel, status, attempts FROM alert_deliveries WHERE left(transaction_id, 6) = 'tx_bad' ORDER BY channel"
    )
    assert rows == [("analysts", "failed", 3), ("ops-webhook", "failed", 3)]


def test_a_worker_with_a_stuck_loop_dies_with_its_supervisor(ns: Namespace, receiver: HttpReceiver, tmp_path: Path) -> None:
    log_path = tmp_path / "alerts.log"
    daemon = start_alerts(ns, webhook_config(tmp_path, receiver), log_path, "--workers", "1")
    try:
        wait_for(lambda: '"ready"' in log_path.read_text(), 30, message="the worker ready")
        (worker,) = worker_pids(daemon.pid)
        os.kill(worker, signal.SIGSTOP)  # runs nothing at all: neither its loop nor a signal handler
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(10)
        wait_for(lambda: not alive(worker), 2, interval=0.05, message="the worker gone with its supervisor")
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)


CRASHING_WORKER = """
    import asyncio, threading
    import uvloop
    from fraudd.alerts.sender import worker_task
    from fraudd.runtime import logs
    from fraudd.runtime.process import WorkerProcess

    logs.setup("INFO", "crashing-worker")
    WorkerProcess(0).install_signals()  # as in a worker: SIGTERM only asks for a stop at a boundary
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def crash() -> None:
        raise RuntimeError("a bug")

    async def start() -> None:
        worker_task(crash(), "crashing")

    asyncio.run_coroutine_threadsafe(start(), loop).result()
    threading.Event().wait()  # the main thread stuck, never reaching a boundary
"""


def test_a_worker_whose_task_crashed_exits_even_when_stuck(tmp_path: Path) -> None:
    from fraudd.alerts.sender import CRASH_EXIT_S, EXIT_CRASHED

    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASHING_WORKER)], capture_output=True, text=True, timeout=CRASH_EXIT_S + 20
    )
    assert process.returncode == EXIT_CRASHED, process.stderr[-2000:]
    assert '"worker_crashed"' in process.stderr + process.stdout


def test_a_new_alert_group_starts_at_the_present_unless_from_the_beginning(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = webhook_config(tmp_path, receiver)
    xadd_alerts(redis_client, ns, ["history_1", "history_2"])  # scored before the alert service existed
    log_path = tmp_path / "alerts.log"
    daemon = start_alerts(ns, config, log_path, "--workers", "1", from_beginning=False)
    try:
        wait_for(lambda: '"ready"' in log_path.read_text(), 30, message="the alert service ready")
        xadd_alerts(redis_client, ns, ["new_1"])
        wait_for(lambda: "new_1:ops-webhook" in receiver.accepted, 30, message="the new alert")
    finally:
        stop_alerts(daemon)
    xadd_alerts(redis_client, ns, ["while_stopped"])
    # An existing group resumes where it was, flag or not.
    daemon = start_alerts(ns, config, log_path, "--workers", "1", from_beginning=True)
    try:
        wait_for(lambda: "while_stopped:ops-webhook" in receiver.accepted, 30, message="the alert written while stopped")
    finally:
        stop_alerts(daemon)
    assert sorted(receiver.accepted) == ["new_1:ops-webhook", "while_stopped:ops-webhook"]
    # A new group told --from-beginning delivers the history too.
    daemon = start_alerts(ns, config, log_path, "--workers", "1", "--alerts-group", "replay", from_beginning=True)
    try:
        wait_for(lambda: len(ns.sql("SELECT 1 FROM alert_deliveries")) == 4, 30, message="the history recorded")
        wait_for(lambda: "history_1:ops-webhook" in receiver.accepted, 30, message="the history delivered")
    finally:
        stop_alerts(daemon)
    assert sorted(receiver.accepted) == sorted(f"{t}:ops-webhook" for t in ("history_1", "history_2", "new_1", "while_stopped"))
    assert not receiver.repeats


def test_due_deliveries_are_taken_within_seconds_through_kills_and_a_burst_of_timeouts(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = webhook_config(tmp_path, receiver, "timeout_s = 1")
    log_path = tmp_path / "alerts.log"
    daemon = start_alerts(ns, config, log_path, "--workers", "2", "--batch-size", "100")
    rng = random.Random(11)

    def overdue_s() -> float:
        (late,) = ns.sql(
            "SELECT coalesce(max(extract(epoch FROM now() - next_attempt_at)), 0) FROM alert_deliveries WHERE status = 'pending'"
        )[0]
        return float(late)

    try:
        wait_for(lambda: '"ready"' in log_path.read_text(), 30, message="the alert service ready")
        for kill in range(5):
            xadd_alerts(redis_client, ns, [f"tx_{i}" for i in range(kill * 500, (kill + 1) * 500)])
            time.sleep(rng.uniform(0.3, 0.8))
            os.kill(rng.choice(worker_pids(daemon.pid)), signal.SIGKILL)
        wait_for(lambda: len(receiver.accepted) == 2500, 60, message="the first alerts")
        wait_for(lambda: len(worker_pids(daemon.pid)) == 2, 10, message="both workers")
        # Then the receiver stalls (150 requests hang past the timeout) while both workers hold
        # deliveries, and one of them is killed in the middle of it: its claims come due when their
        # lease ends (2 x timeout_s + 5 s), the timed-out ones when their back-off does, and both
        # workers (the survivor and the one started in place of the dead) have just seen a burst of
        # timeouts. Whichever is alive must take what is due within seconds.
        receiver.failures["/hook"] = Failures(count=150, status=503, delay_s=3.0)
        xadd_alerts(redis_client, ns, [f"tx_{i}" for i in range(2500, 3000)])
        time.sleep(0.5)
        os.kill(rng.choice(worker_pids(daemon.pid)), signal.SIGKILL)
        worst, deadline = 0.0, time.monotonic() + 40
        while len(receiver.accepted) < 3000 and time.monotonic() < deadline:
            worst = max(worst, overdue_s())
            time.sleep(0.5)
        assert len(receiver.accepted) == 3000, (len(receiver.accepted), worst, log_path.read_text()[-3000:])
        assert worst < 10, worst
        wait_for(
            lambda: ns.sql("SELECT count(*) FROM alert_deliveries WHERE status = 'delivered'")[0][0] == 3000,
            30,
            message="every delivery recorded",
        )
    finally:
        stop_alerts(daemon)
    log = log_path.read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert '"worker_crashed"' not in log, log[-3000:]
    assert sorted(receiver.accepted) == sorted(f"tx_{i}:ops-webhook" for i in range(3000))


def test_only_the_scoring_housekeeping_creates_transactions_partitions(ns: Namespace, tmp_path: Path) -> None:
    from fraudd import cli
    from fraudd.alerts.config import load
    from fraudd.alerts.service import service as alerts_service
    from fraudd.alerts.settings import AlertSettings
    from fraudd.schema import connect
    from fraudd.scoring.settings import ScoringSettings
    from fraudd.scoring.worker import service as scoring_service

    partition = f"transactions_{(datetime.now(UTC) + timedelta(days=3)):%Y%m%d}"
    with connect(ns.postgres_url, ns.schema, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {partition}")
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    config = write_config(
        tmp_path,
        f'[[channels]]\nname = "ops"\nkind = "webhook"\nurl = "http://127.0.0.1:9/hook"\nallow_insecure = true\n'
        f'secret_file = "{secret}"\n',
    )
    common = ["--redis-url", ns.redis_url, "--postgres-url", ns.postgres_url, "--pg-schema", ns.schema]

    def exists() -> bool:
        return ns.sql("SELECT to_regclass(%s) IS NOT NULL", (partition,)) == [(True,)]

    alert_settings = AlertSettings.from_params(cli.alerts.make_context("alerts", [*common, "--config", str(config)]).params)
    alerts_service(alert_settings, load(config)).housekeeping()
    assert not exists()
    scoring = ScoringSettings.from_params(cli.run.make_context("run", [*common, "--stream", ns.stream]).params)
    scoring_service(scoring).housekeeping()
    assert exists()
