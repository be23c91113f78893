"""Alert delivery against real peers: what each channel sends, retries, Retry-After, a dead channel,
storm digests. The sender runs in-process here; ``test_alerts_service.py`` runs ``fraudd alerts``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from standardwebhooks import Webhook

from fraudd.alerts.config import load
from fraudd.alerts.deliveries import Claimed
from fraudd.alerts.sender import POLL_S, AlertSender, SenderSettings

from .alerting import SECRET, SMTP_PASSWORD, SMTP_USER, Failures, HttpReceiver, SmtpServer, webhook_channel
from .conftest import Namespace, wait_for


def alert(
    txid: str, decision: str = "decline", amount: float = 512.3, score: float = 0.97, reasons: tuple[str, ...] = ("velocity_1h",)
) -> dict:
    """A fraud-stream document (the `transactions` row, DESIGN.md)."""
    return {
        "transaction_id": txid,
        "user_id": "user_x1",
        "amount": amount,
        "currency": "USD",
        "merchant": "Amazon",
        "mcc": None,
        "country": "FR",
        "card_id": None,
        "device_id": None,
        "ip": None,
        "channel": "ecom",
        "lat": None,
        "lon": None,
        "event_time": 1764385200.0,
        "stream_id": "1764385200000-0",
        "scored_at": 1764385200.5,
        "score": score,
        "decision": decision,
        "reasons": list(reasons),
        "model_version": "test-1",
        "explanation": None,
    }


EXPLAINED = {
    "base": -6.1,
    "contributions": {"card_count_1m": 2.31, "new_device": 1.05, "amount_to_mean": -0.52, "hour_utc": 0.01},
    "values": {"card_count_1m": 4.0, "new_device": 1.0, "amount_to_mean": 0.4, "hour_utc": 3.0},
}


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "alerts.toml"
    path.write_text(body)
    return path


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


def run_sender(ns: Namespace, config_path: Path, environ: dict[str, str], max_attempts: int = 5) -> AlertSender:
    sender = AlertSender(
        load(config_path, environ),
        SenderSettings(ns.redis_url, ns.postgres_url, ns.schema, ns.fraud_stream, ns.dlq_stream, max_attempts, "test-0"),
    )
    sender.start()
    return sender


def publish(client: redis.Redis, ns: Namespace, sender: AlertSender, documents: list[dict]) -> list[str]:
    """XADD the alerts to the fraud stream and hand them to the sender as the consumer would."""
    payloads = [orjson.dumps(d) for d in documents]
    ids = [client.xadd(ns.fraud_stream, {"data": p}).decode() for p in payloads]
    assert sender.handle(ids, payloads) == []
    return ids


def deliveries(ns: Namespace) -> dict[tuple[str, str], tuple]:
    rows = ns.sql(
        "SELECT transaction_id, channel, status, attempts, last_error, delivered_at IS NOT NULL, digest_id FROM alert_deliveries"
    )
    return {(r[0], r[1]): r[2:] for r in rows}


def test_each_channel_sends_its_exact_content(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    with SmtpServer(tmp_path) as smtp:
        config = write_config(
            tmp_path,
            f"""
{webhook_channel(receiver.url("/hook"), "ops-webhook", "TEST_WEBHOOK_SECRET", decisions=["review", "decline"])}

[[channels]]
name = "fraud-slack"
kind = "slack"
url_env = "TEST_SLACK_URL"
allow_insecure = true
decisions = ["decline"]
min_amount = 100
console_url = "https://console.example/tx/{{transaction_id}}"

[[channels]]
name = "analysts"
kind = "email"
host = "127.0.0.1"
port = {smtp.port}
tls = "starttls"
ca_file = "{smtp.cert}"
username = "{SMTP_USER}"
password_env = "TEST_SMTP_PASSWORD"
from = "fraudd@bank.example"
to = ["analysts@bank.example", "oncall@bank.example"]
reasons = ["velocity_1h"]
""",
        )
        environ = {"TEST_WEBHOOK_SECRET": SECRET, "TEST_SLACK_URL": receiver.url("/slack"), "TEST_SMTP_PASSWORD": SMTP_PASSWORD}
        sender = run_sender(ns, config, environ)
        try:
            documents = [
                {**alert("tx_big"), "explanation": EXPLAINED},
                alert("tx_review", decision="review", reasons=("new_device",)),
                alert("tx_small", amount=20.0),
            ]
            ids = publish(redis_client, ns, sender, documents)
            wait_for(
                lambda: sum(1 for row in deliveries(ns).values() if row[0] == "delivered") == 6, 20, message="six deliveries"
            )
        finally:
            sender.stop(5)

        # Webhook: every alert, body = data, signed per Standard Webhooks, id <transaction_id>:<channel>.
        headers, body, _t = receiver.requests["/hook"][0]
        assert Webhook(SECRET).verify(body, headers) in documents
        assert sorted(receiver.accepted) == ["tx_big:ops-webhook", "tx_review:ops-webhook", "tx_small:ops-webhook"]
        assert receiver.accepted["tx_review:ops-webhook"] == documents[1]
        assert not receiver.repeats

        # Slack: declines of at least 100 only, as Block Kit with a console link.
        (message,) = receiver.bodies("/slack")
        assert "DECLINE" in message["text"] and "tx_big" not in message["text"]
        fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in message["blocks"][1]["fields"]}
        assert fields == {
            "*Amount*": "512.30 USD",
            "*User*": "user_x1",
            "*Merchant*": "Amazon",
            "*Score*": "0.970",
            "*Decision*": "decline",
            "*Reasons*": "velocity_1h",
            # What moved the score most, either way, from the model's exact explanation.
            "*Why (log-odds)*": "card_count_1m = 4 (+2.31), new_device = 1 (+1.05), amount_to_mean = 0.4 (-0.52)",
        }
        assert message["blocks"][-1]["elements"][0]["url"] == "https://console.example/tx/tx_big"

        # E-mail: alerts with reason velocity_1h, over STARTTLS with AUTH, plain and HTML parts.
        assert sorted(m["Message-ID"] for m in smtp.mailbox.messages) == [
            "<tx_big.analysts@fraudd>",
            "<tx_small.analysts@fraudd>",
        ]
        mail = next(m for m in smtp.mailbox.messages if "tx_big" in m["Message-ID"])
        assert smtp.mailbox.envelopes[0] == ("fraudd@bank.example", ["analysts@bank.example", "oncall@bank.example"])
        assert mail["Subject"] == "[fraudd] DECLINE: 512.30 USD at Amazon by user_x1 (score 0.970)"
        plain = mail.get_body(("plain",)).get_content()
        html = mail.get_body(("html",)).get_content()
        assert plain.replace("\r\n", "\n") == (
            "Transaction: tx_big\nAmount: 512.30 USD\nUser: user_x1\nMerchant: Amazon\n"
            "Score: 0.970\nDecision: decline\nReasons: velocity_1h\n"
            "Why (log-odds): card_count_1m = 4 (+2.31), new_device = 1 (+1.05), amount_to_mean = 0.4 (-0.52)\n"
        )
        assert "<th align=left>Merchant</th><td>Amazon</td>" in html

        rows = deliveries(ns)
        assert set(rows) == {
            ("tx_big", "ops-webhook"),
            ("tx_review", "ops-webhook"),
            ("tx_small", "ops-webhook"),
            ("tx_big", "fraud-slack"),
            ("tx_big", "analysts"),
            ("tx_small", "analysts"),
        }
        assert all(row[:2] == ("delivered", 1) and row[3] for row in rows.values())
        assert ns.sql("SELECT stream_id FROM alert_deliveries WHERE transaction_id = 'tx_big' LIMIT 1")[0][0] == ids[0]


def test_a_receiver_failing_n_times_gets_one_delivery_after_n_plus_one_attempts(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook"), retry_base_s=0.05),
    )
    receiver.failures["/hook"] = Failures(count=3, status=503)
    sender = run_sender(ns, config, {"S": SECRET})
    try:
        publish(redis_client, ns, sender, [alert("tx_1")])
        wait_for(lambda: deliveries(ns).get(("tx_1", "hook"), ("",))[0] == "delivered", 20, message="delivery")
    finally:
        sender.stop(5)
    status, attempts, last_error, delivered, _digest = deliveries(ns)[("tx_1", "hook")]
    assert (status, attempts, delivered) == ("delivered", 4, True)
    assert last_error == "HTTP 503: unavailable"
    assert len(receiver.requests["/hook"]) == 4
    assert {h["webhook-id"] for h, _b, _t in receiver.requests["/hook"]} == {"tx_1:hook"}
    assert list(receiver.accepted) == ["tx_1:hook"] and not receiver.repeats


def test_slack_429_retry_after_is_honoured(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        """
[[channels]]
name = "slack"
kind = "slack"
url_env = "TEST_SLACK_URL"
allow_insecure = true
retry_base_s = 0.01
""",
    )
    receiver.failures["/slack"] = Failures(count=1, status=429, retry_after="2")
    sender = run_sender(ns, config, {"TEST_SLACK_URL": receiver.url("/slack")})
    try:
        publish(redis_client, ns, sender, [alert("tx_a"), alert("tx_b")])
        wait_for(lambda: [r[0] for r in deliveries(ns).values()] == ["delivered"] * 2, 20, message="deliveries")
    finally:
        sender.stop(5)
    requests = [(orjson.loads(body)["blocks"][2]["elements"][0]["text"], t) for _h, body, t in receiver.requests["/slack"]]
    # The first request got the 429 (the other was already in flight); its retry waited the 2 s asked for.
    assert len(requests) == 3
    (limited, limited_at), later = requests[0], requests[1:]
    assert next(t for text, t in later if text == limited) - limited_at >= 1.9
    assert sorted(r[1] for r in deliveries(ns).values()) == [1, 2]


def test_a_channel_down_for_good_is_dead_lettered_and_blocks_no_other(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f"""
{webhook_channel("http://127.0.0.1:9/hook", "gone", retry_base_s=0.02, retry_max_s=0.1)}

{webhook_channel(receiver.url("/hook"), "alive")}
""",
    )
    sender = run_sender(ns, config, {"S": SECRET}, max_attempts=3)
    try:
        documents = [alert(f"tx_{i}") for i in range(20)]
        ids = publish(redis_client, ns, sender, documents)
        wait_for(lambda: len(receiver.accepted) == 20, 10, message="the live channel's deliveries")
        wait_for(lambda: redis_client.xlen(ns.dlq_stream) == 20, 30, message="dead letters")
    finally:
        sender.stop(5)
    rows = deliveries(ns)
    assert all(rows[(f"tx_{i}", "alive")][:2] == ("delivered", 1) for i in range(20))
    assert all(rows[(f"tx_{i}", "gone")][:2] == ("failed", 3) for i in range(20))
    letters = [{k.decode(): v.decode() for k, v in f.items()} for _i, f in redis_client.xrange(ns.dlq_stream)]
    letter = next(item for item in letters if item["source_id"] == ids[0])
    assert letter["reason"] == "alert_undeliverable" and letter["channel"] == "gone" and letter["attempts"] == "3"
    assert "ConnectionRefused" in letter["detail"] or "Connect" in letter["detail"], letter["detail"]
    assert orjson.loads(letter["data"]) == documents[0]

    # The channel is fixed; `fraudd dlq replay` makes its given-up deliveries due again.
    replay = ns.fraudd("dlq", "replay", "--reason", "alert_undeliverable")
    assert replay.returncode == 0 and "20 alert deliveries due again" in replay.stdout, replay.stderr
    assert redis_client.xlen(ns.dlq_stream) == 0
    config.write_text(config.read_text().replace("http://127.0.0.1:9/hook", receiver.url("/hook-fixed")))
    sender = run_sender(ns, config, {"S": SECRET}, max_attempts=3)
    try:
        wait_for(lambda: all(row[0] == "delivered" for row in deliveries(ns).values()), 20, message="the replayed deliveries")
    finally:
        sender.stop(5)
    assert sorted(k for k in receiver.accepted if k.endswith(":gone")) == sorted(f"tx_{i}:gone" for i in range(20))
    assert all(deliveries(ns)[(f"tx_{i}", "gone")][1] == 1 for i in range(20))  # a fresh count of attempts


def test_a_refusal_for_good_is_dead_lettered_after_one_attempt(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    with SmtpServer(tmp_path) as smtp:
        config = write_config(
            tmp_path,
            f"""
{webhook_channel(receiver.url("/hook"))}

[[channels]]
name = "mail"
kind = "email"
host = "127.0.0.1"
port = {smtp.port}
tls = "starttls"
ca_file = "{smtp.cert}"
username = "{SMTP_USER}"
password_env = "P"
from = "fraudd@bank.example"
to = ["nobody@unknown.example"]
""",
        )
        receiver.failures["/hook"] = Failures(count=1, status=400)
        sender = run_sender(ns, config, {"S": SECRET, "P": SMTP_PASSWORD}, max_attempts=5)
        try:
            publish(redis_client, ns, sender, [alert("tx_1")])
            wait_for(lambda: redis_client.xlen(ns.dlq_stream) == 2, 20, message="dead letters")
        finally:
            sender.stop(5)
    # Neither a 400 nor a 550 changes on a retry: one attempt each, then the DLQ.
    rows = deliveries(ns)
    assert rows[("tx_1", "hook")][:2] == ("failed", 1) and rows[("tx_1", "mail")][:2] == ("failed", 1)
    letters = {f[b"channel"].decode(): f for _i, f in redis_client.xrange(ns.dlq_stream)}
    assert letters["hook"][b"detail"] == b"HTTP 400: unavailable" and letters["hook"][b"attempts"] == b"1"
    assert b"550" in letters["mail"][b"detail"] and letters["mail"][b"attempts"] == b"1"
    assert len(receiver.requests["/hook"]) == 1 and not smtp.mailbox.messages


def test_a_storm_is_grouped_into_digests(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    with SmtpServer(tmp_path) as smtp:
        config = write_config(
            tmp_path,
            f"""
[[channels]]
name = "slack"
kind = "slack"
url_env = "TEST_SLACK_URL"
allow_insecure = true
digest_above = 3
digest_interval_s = 1

[[channels]]
name = "analysts"
kind = "email"
host = "127.0.0.1"
port = {smtp.port}
ca_file = "{smtp.cert}"
username = "{SMTP_USER}"
password_env = "P"
from = "fraudd@bank.example"
to = ["analysts@bank.example"]
digest_above = 1
digest_interval_s = 1
""",
        )
        sender = run_sender(ns, config, {"P": SMTP_PASSWORD, "TEST_SLACK_URL": receiver.url("/slack")})
        try:
            publish(redis_client, ns, sender, [alert(f"tx_{i}", amount=100.0) for i in range(40)])
            wait_for(lambda: all(r[0] == "delivered" for r in deliveries(ns).values()), 20, message="the digests")
        finally:
            sender.stop(5)
        mails = list(smtp.mailbox.messages)
    messages = receiver.bodies("/slack")
    singles = [m for m in messages if m["text"].startswith("Fraud alert DECLINE")]
    digests = [m for m in messages if m["text"].startswith("Fraud alert digest")]
    assert len(singles) == 3 and len(digests) == 1, [m["text"] for m in messages]
    assert digests[0]["text"] == "Fraud alert digest: 37 alerts (37 decline), 3,700.00 in total"
    assert "and 17 more" in digests[0]["blocks"][2]["text"]["text"]

    subjects = sorted(m["Subject"] for m in mails)
    assert subjects == [
        "[fraudd] DECLINE: 100.00 USD at Amazon by user_x1 (score 0.970)",
        "[fraudd] digest: 39 alerts (39 decline), 3,900.00 in total",
    ], subjects
    digest_mail = next(m for m in mails if "digest" in m["Subject"])
    assert "and 19 more in alert_deliveries" in digest_mail.get_body(("plain",)).get_content()
    assert digest_mail.get_body(("html",)).get_content().count("<li>") == 20

    rows = deliveries(ns)
    assert len(rows) == 80  # every alert is in the delivery log, once per channel
    assert sum(1 for (_t, channel), r in rows.items() if channel == "slack" and r[4] is not None) == 37
    assert sum(1 for (_t, channel), r in rows.items() if channel == "analysts" and r[4] is not None) == 39


def test_a_bad_config_names_the_key(tmp_path: Path) -> None:
    from fraudd.alerts.config import AlertConfigError

    cases = {
        'name = "a"\nkind = "pager"': "channels[0] (a).kind: 'pager': must be one of webhook, slack, email",
        'name = "a"\nkind = "webhook"\nurl = "http://x"\nsecret = "whsec_abc"': "channels[0] (a).secret: secrets are never read",
        'name = "a"\nkind = "webhook"\nurl = "https://x"\nsecret_env = "NOPE"': (
            "channels[0] (a).secret_env: environment variable NOPE is not set"
        ),
        'name = "a"\nkind = "slack"\nurl_env = "U"\ndecisions = ["approve"]': "channels[0] (a).decisions: must list some of",
        'name = "a"\nkind = "email"\nhost = "h"\nfrom = "f@x"\nto = ["t@x"]\nusername = "u"': (
            "channels[0] (a).password_env: a username needs"
        ),
        'name = "a"\nkind = "email"\nhost = "h"\ntls = "none"\nfrom = "f@x"\nto = ["t@x"]\nusername = "u"\npassword_env = "P"': (
            'channels[0] (a).tls: "none" would send the SMTP password in clear'
        ),
        'name = "a"\nkind = "slack"\nurl = "https://hooks.slack.com/services/T/B/x"': (
            "channels[0] (a).url: secrets are never read from the config; use url_env or url_file"
        ),
        'name = "a"\nkind = "webhook"\nurl = "http://x"\nsecret_env = "S"': (
            "channels[0] (a).url: 'http://x': must be https:// (or set allow_insecure = true"
        ),
        'name = "a"\nkind = "webhook"\nurl = "ftp://x"\nallow_insecure = true\nsecret_env = "S"': (
            "channels[0] (a).url: 'ftp://x': must be an https:// URL"
        ),
    }
    for body, expected in cases.items():
        path = write_config(tmp_path, f"[[channels]]\n{body}\n")
        with pytest.raises(AlertConfigError) as raised:
            load(path, {})
        assert expected in str(raised.value) and "\n" not in str(raised.value)


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def test_a_flaky_receiver_failing_one_alert_in_ten_stalls_nothing(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook")),
    )
    # A load balancer answering 503 to one alert in ten, twice each, then 200.
    receiver.flaky.update({f"tx_{i}:hook": 2 for i in range(0, 600, 10)})
    sender = run_sender(ns, config, {"S": SECRET})
    started = time.monotonic()
    try:
        publish(redis_client, ns, sender, [alert(f"tx_{i}") for i in range(600)])
        # Each failing alert waits its own back-off (0.5-1 s, then 1-2 s) while the others go on.
        wait_for(lambda: len(receiver.accepted) == 600, 15, message="every alert delivered")
        wait_for(lambda: all(r[0] == "delivered" for r in deliveries(ns).values()), 10, message="every delivery recorded")
    finally:
        sender.stop(5)
    assert time.monotonic() - started < 15
    rows = deliveries(ns)
    assert sorted(attempts for _s, attempts, *_r in rows.values()) == [1] * 540 + [3] * 60
    assert len(receiver.requests["/hook"]) == 600 + 2 * 60 and not receiver.repeats
    assert not _events(caplog, "alerts_channel_down")


def test_a_retry_is_made_by_its_worker_not_behind_the_backlog(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook"), concurrency=2, retry_base_s=0.02),
    )
    receiver.flaky["tx_0:hook"] = 2
    sender = run_sender(ns, config, {"S": SECRET})
    try:
        publish(redis_client, ns, sender, [alert(f"tx_{i}") for i in range(1000)])
        wait_for(lambda: len(receiver.accepted) == 1000, 30, message="every alert delivered")
        wait_for(lambda: all(r[0] == "delivered" for r in deliveries(ns).values()), 10, message="every delivery recorded")
    finally:
        sender.stop(5)
    # Its retries (after 10-20 ms, then 20-40 ms) came from the worker holding it, among the first
    # deliveries, not after the hundreds of rows that were due before them in the table.
    assert list(receiver.accepted).index("tx_0:hook") < 200
    assert deliveries(ns)[("tx_0", "hook")][:4] == ("delivered", 3, "HTTP 503: unavailable", True)
    assert len(receiver.requests["/hook"]) == 1002 and not receiver.repeats


def test_retries_waiting_their_back_off_do_not_poll_the_table_per_request(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook"), retry_base_s=0.4),
    )
    # Every alert is claimed at its insert; one in four then retries twice, spread over its back-offs.
    receiver.flaky.update({f"tx_{i}:hook": 2 for i in range(0, 40, 4)})
    sender = AlertSender(
        load(config, {"S": SECRET}),
        SenderSettings(ns.redis_url, ns.postgres_url, ns.schema, ns.fraud_stream, ns.dlq_stream, 5, "test-0"),
    )
    claims: list[int] = []
    claim = sender.log.claim

    async def counted_claim(channel: str, status: str, limit: int, lease_s: float) -> list[Claimed]:
        claimed = await claim(channel, status, limit, lease_s)
        claims.append(len(claimed))
        return claimed

    sender.log.claim = counted_claim  # type: ignore[method-assign]
    sender.start()
    started = time.monotonic()
    try:
        publish(redis_client, ns, sender, [alert(f"tx_{i}") for i in range(40)])
        wait_for(lambda: len(receiver.accepted) == 40, 15, message="every alert delivered")
        elapsed = time.monotonic() - started
    finally:
        sender.stop(5)
    assert len(receiver.requests["/hook"]) == 40 + 2 * 10 and not receiver.repeats
    # The table held nothing due after the insert: it was looked at again every POLL_S, not after
    # each of the 20 retries.
    assert not any(claims) and len(claims) <= 2 + elapsed / POLL_S, (claims, elapsed)


def test_a_retry_held_by_a_stopping_worker_goes_back_to_the_table_on_its_retry_after(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook")),
    )
    receiver.failures["/hook"] = Failures(count=1, status=503, retry_after="4")
    sender = run_sender(ns, config, {"S": SECRET})
    try:
        publish(redis_client, ns, sender, [alert("tx_1")])
        wait_for(lambda: len(receiver.requests["/hook"]) == 1, 10, message="the first attempt")
        time.sleep(0.3)
    finally:
        sender.stop(5)
    assert deliveries(ns)[("tx_1", "hook")][:4] == ("pending", 1, "HTTP 503: unavailable", False)
    ((wait,),) = ns.sql("SELECT extract(epoch FROM next_attempt_at - last_attempt_at) FROM alert_deliveries")
    assert 3.9 <= float(wait) <= 4.1, wait
    sender = run_sender(ns, config, {"S": SECRET})
    try:
        wait_for(lambda: deliveries(ns)[("tx_1", "hook")][0] == "delivered", 20, message="the delivery")
    finally:
        sender.stop(5)
    (_h, _b, first), (_h2, _b2, second) = receiver.requests["/hook"]
    assert second - first >= 3.9
    assert deliveries(ns)[("tx_1", "hook")][:4] == ("delivered", 2, "HTTP 503: unavailable", True)
    assert list(receiver.accepted) == ["tx_1:hook"] and not receiver.repeats


def test_a_burst_of_timeouts_opens_the_circuit_once_for_a_logged_moment(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook"), timeout_s=0.5, concurrency=40),
    )
    # 26 requests hang past the timeout at once, then the receiver is healthy again.
    receiver.failures["/hook"] = Failures(count=26, status=503, delay_s=2.0)
    sender = run_sender(ns, config, {"S": SECRET})
    try:
        publish(redis_client, ns, sender, [alert(f"tx_{i}") for i in range(40)])
        wait_for(lambda: len(receiver.accepted) == 40, 10, message="every alert delivered")
        wait_for(lambda: all(r[0] == "delivered" for r in deliveries(ns).values()), 10, message="every delivery recorded")
    finally:
        sender.stop(5)
    assert {row[2] for row in deliveries(ns).values() if row[1] == 2} == {"timed out"}
    # The simultaneous timeouts are one outage: the circuit opened once, for the first back-off
    # step (retry_base_s 1: 0.5-1 s), said so, and closed on the first successful probe.
    (down,) = _events(caplog, "alerts_channel_down")
    assert 0.5 <= down.open_s <= 1.0 and down.channel == "hook", down.__dict__
    (up,) = _events(caplog, "alerts_channel_up")
    assert up.channel == "hook" and up.down_s < 5


def test_redirects_are_not_followed(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(
        tmp_path,
        webhook_channel(receiver.url("/hook"), retry_base_s=0.01),
    )
    receiver.failures["/hook"] = Failures(count=100, status=307, location=receiver.url("/elsewhere"))
    sender = run_sender(ns, config, {"S": SECRET}, max_attempts=2)
    try:
        publish(redis_client, ns, sender, [alert("tx_1")])
        wait_for(lambda: redis_client.xlen(ns.dlq_stream) == 1, 20, message="the dead letter")
    finally:
        sender.stop(5)
    assert deliveries(ns)[("tx_1", "hook")][:3] == ("failed", 2, "HTTP 307: unavailable")
    assert len(receiver.requests["/hook"]) == 2 and not receiver.requests["/elsewhere"]
    assert not _events(caplog, "worker_crashed")


def test_slack_ids_are_escaped_links_encoded_and_the_url_token_never_shown(
    ns: Namespace, redis_client: redis.Redis, receiver: HttpReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token_path = "/services/T0001/B0001/XyZsecretTOKEN42"
    config = write_config(
        tmp_path,
        """
[[channels]]
name = "slack"
kind = "slack"
url_env = "SLACK_URL"
allow_insecure = true
console_url = "https://console.example/tx/{transaction_id}?from=slack"

[[channels]]
name = "gone-slack"
kind = "slack"
url_env = "GONE_SLACK_URL"
allow_insecure = true
""",
    )
    # A server that echoes the path it was asked for in its error page (as many do on a 404).
    receiver.failures[token_path] = Failures(count=100, status=404, text="Cannot POST {path}")
    environ = {"SLACK_URL": receiver.url("/slack"), "GONE_SLACK_URL": receiver.url(token_path)}
    sender = run_sender(ns, config, environ)
    hostile = alert("tx/<1>&?#x")
    hostile["merchant"] = "<!channel> & <https://evil.example|click here>"
    hostile["user_id"] = "<@U024BE7LH>"
    try:
        publish(redis_client, ns, sender, [hostile])
        wait_for(lambda: redis_client.xlen(ns.dlq_stream) == 1, 20, message="the gone channel's dead letter")
        wait_for(lambda: len(receiver.requests["/slack"]) == 1, 20, message="the Slack message")
    finally:
        sender.stop(5)
    (message,) = receiver.bodies("/slack")
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in message["blocks"][1]["fields"]}
    assert fields["*Merchant*"] == "&lt;!channel&gt; &amp; &lt;https://evil.example|click here&gt;"
    assert fields["*User*"] == "&lt;@U024BE7LH&gt;"
    assert message["blocks"][2]["elements"][0]["text"] == "transaction `tx/&lt;1&gt;&amp;?#x`"
    assert "<" not in message["text"] and "&lt;!channel&gt;" in message["text"]
    assert message["blocks"][-1]["elements"][0]["url"] == "https://console.example/tx/tx%2F%3C1%3E%26%3F%23x?from=slack"

    assert len(receiver.requests[token_path]) == 1  # refused for good: one attempt
    (letter,) = [f for _i, f in redis_client.xrange(ns.dlq_stream)]
    row = deliveries(ns)[("tx/<1>&?#x", "gone-slack")]
    assert row[:2] == ("failed", 1)
    assert letter[b"detail"].decode() == row[2] == "HTTP 404: Cannot POST /[redacted]"
    assert not [r for r in caplog.records if "XyZsecretTOKEN42" in r.getMessage() + str(r.__dict__)]
