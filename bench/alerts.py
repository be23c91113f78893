"""``bench alerts``: alerts/s that ``fraudd alerts`` delivers to a local webhook receiver, and the
delivery latency at a fixed fraction of that rate.

Throughput: the fraud stream is prefilled with ``n`` alerts and ``fraudd alerts`` (1, then 2
processes) delivers each to one signed-webhook channel; the rate is counted at the receiver
(``bench.receiver``, a separate process verifying every signature), from its first accepted
alert to its last. Latency: a paced open-loop writer XADDs alerts at ``fraction`` × the
one-process rate; each alert's latency is its first arrival at the receiver minus its fraud-stream
entry id's millisecond timestamp (when Redis accepted it), as the service's
``fraudd_alert_delivery_latency_seconds`` defines it.

The rate is over the time the service was sending: once every alert has had its first attempt,
what is left is the retries of the last failing alerts, a trickle of requests spread over their
back-offs. That tail counts for the time its requests take at the rate the run made requests
until then; the rest of it is the service waiting out back-offs and is left out (``idle_tail_s``;
a healthy run has none). Those waits are the latency of the last failing alerts, not work per
alert (with a stream that keeps flowing, other alerts fill them): counted, they would make the
flaky rate depend on ``n``. ``drain_alerts_per_s`` is the plain first-to-last-arrival rate,
reported too. Every run checks that each alert arrived
once, no ``webhook-id`` twice, and that ``alert_deliveries`` holds one delivered row per alert.

Flaky: the 1-process throughput run again, in the same run, against a receiver behind a flaky
load balancer (``--flaky-every 10``: one alert in ten answered 503 twice, then served), with the
channel's default retry settings; its rate over the healthy one is the share of throughput a
partial failure costs (the failing alerts' retries wait their back-off, the others go on).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
import numpy as np
import orjson
import redis
import uvloop

from bench import procstat, report
from bench.namespace import FRAUDD, Namespace
from bench.runners import ConsumerFailed, Consumers, Setup
from fraudd.alerts.channels import Alert, WebhookChannel
from fraudd.alerts.config import ChannelConfig, WebhookTarget
from fraudd.localservers import free_port

SECRET = "whsec_ZnJhdWRkLWJlbmNoLXNpZ25pbmcta2V5LTAwMDE="
CHUNK = 500
GROUP = "fraudd-alerts"  # the default of fraudd alerts --alerts-group


def alert_document(i: int, prefix: str) -> dict:
    """A fraud-stream document shaped like the scoring worker's (the `transactions` row)."""
    return {
        "transaction_id": f"{prefix}_{i}",
        "user_id": f"user_{i % 997}",
        "amount": round(10 + (i * 7.31) % 900, 2),
        "currency": "USD",
        "merchant": "Amazon",
        "mcc": "5732",
        "country": "FR",
        "card_id": None,
        "device_id": None,
        "ip": None,
        "channel": "ecom",
        "lat": None,
        "lon": None,
        "event_time": time.time(),
        "stream_id": f"{int(time.time() * 1000)}-{i}",
        "scored_at": time.time(),
        "score": 0.93,
        "decision": "decline" if i % 3 else "review",
        "reasons": ["velocity_1h", "model:amount"],
        "model_version": "bench",
    }


class Receiver:
    """``bench.receiver`` in its own process."""

    def __init__(self, log_path: Path, flaky_every: int = 0) -> None:
        self.port = free_port()
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.receiver",
                "--port",
                str(self.port),
                "--secret",
                SECRET,
                "--flaky-every",
                str(flaky_every),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise ConsumerFailed(f"webhook receiver did not start; log {log_path}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stats(self) -> dict:
        return self._get("stats")

    def arrived(self) -> int:
        """How many alerts arrived: cheap enough to poll while the service is measured."""
        return int(self._get("arrivals")["arrivals"])

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/{path}", timeout=30) as response:
            return orjson.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


def bare_client(setup: Setup, n: int, concurrency: int = 64) -> dict:
    """The ceiling: the same signed webhooks sent by fraudd's own webhook channel in a bare loop
    (no stream, no delivery log), as many in flight as the channel's default concurrency."""
    receiver = None
    try:
        receiver = Receiver(setup.log_dir / "bare-client.receiver.log")
        config = ChannelConfig("bench-hook", "webhook", WebhookTarget(receiver.url, SECRET), concurrency=concurrency)
        alerts = [Alert(f"bare_{i}", "0-0", orjson.dumps(alert_document(i, "bare"))) for i in range(n)]

        async def send_all() -> float:
            channel = WebhookChannel(config)
            await channel.open()
            queue = iter(alerts)

            async def sender() -> None:
                for alert in queue:
                    await channel.send(alert)

            started = time.process_time()
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            cpu_s = time.process_time() - started
            await channel.close()
            return cpu_s

        setup.echo(f"  bare client: {n:,} signed webhooks, {concurrency} in flight ...")
        cpu_s = uvloop.run(send_all())
        times = np.array(sorted(receiver.stats()["arrivals"].values()))
        seconds = float(times[-1] - times[0])
        return {
            "processes": 1,
            "alerts": n,
            "seconds": round(seconds, 3),
            "alerts_per_s": round((n - 1) / seconds, 1) if seconds > 0 else None,
            "drain_alerts_per_s": round((n - 1) / seconds, 1) if seconds > 0 else None,
            "idle_tail_s": 0.0,
            "service_cpu_s": round(cpu_s, 2),
            "service_cpu_us_per_alert": round(cpu_s / n * 1e6, 1),
            "receiver_cpu_s": None,
            "checks": {"exactly_once": len(times) == n},
        }
    finally:
        if receiver is not None:
            receiver.stop()


def _start(setup: Setup, ns: Namespace, receiver: Receiver, processes: int, label: str) -> Consumers:
    config = setup.log_dir / f"{ns.name}.toml"
    secret = setup.log_dir / f"{ns.name}.secret"
    secret.write_text(SECRET)
    config.write_text(
        f'[[channels]]\nname = "bench-hook"\nkind = "webhook"\nurl = "{receiver.url}"\nallow_insecure = true\n'
        f'secret_file = "{secret}"\n'
    )
    command = [
        *FRAUDD,
        "alerts",
        "--config",
        str(config),
        *_alerts_args(setup.fraudd_args),
        "--workers",
        str(processes),
        "--from-beginning",
    ]
    return Consumers(label, [command], ns, setup.log_dir / f"{ns.name}.log", supervised=True, count=processes)


def _alerts_args(args: list[str]) -> list[str]:
    """The options of ``args`` (given for ``fraudd run``) that ``fraudd alerts`` takes too (``--shards``,
    ``--model-path`` and the like are the scoring's alone)."""
    from fraudd.cli import alerts, run

    def options(command: click.Command) -> dict[str, click.Parameter]:
        return {flag: param for param in command.params for flag in param.opts}

    run_options, alerts_options = options(run), options(alerts)
    kept, i = [], 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        param = run_options.get(flag)
        width = 1 if param is None or getattr(param, "is_flag", False) or "=" in args[i] else 2
        if flag in alerts_options:
            kept += args[i : i + width]
        i += width
    return kept


def _xadd(client: redis.Redis, stream: str, documents: list[dict]) -> list[str]:
    with client.pipeline(transaction=False) as pipe:
        for document in documents:
            pipe.xadd(stream, {"data": orjson.dumps(document)})
        return pipe.execute()


def _wait_arrivals(receiver: Receiver, consumers: Consumers, expected: int, stall_s: float = 60.0) -> dict:
    progress_at, last = time.monotonic(), -1
    while True:
        count = receiver.arrived()
        if count >= expected:
            return receiver.stats()
        if count != last:
            progress_at, last = time.monotonic(), count
        elif time.monotonic() - progress_at > stall_s:
            raise ConsumerFailed(
                f"{consumers.label}: {count}/{expected} delivered, no progress for {stall_s:.0f}s:\n{consumers.log_tail()}"
            )
        consumers.check_alive()
        time.sleep(0.1)


def _checks(ns: Namespace, stats: dict, expected: int, exit_codes: list[int]) -> dict:
    rows = ns.sql("SELECT status, count(*), max(attempts) FROM alert_deliveries GROUP BY status")
    delivered = next((count for status, count, _a in rows if status == "delivered"), 0)
    attempts = ns.sql("SELECT attempts, count(*) FROM alert_deliveries GROUP BY attempts ORDER BY attempts")
    return {
        "expected": expected,
        "arrived": len(stats["arrivals"]),
        "repeats": stats["repeats"],
        "bad_signatures": stats["bad_signatures"],
        "failed_503": stats["failed_503"],
        "delivered_rows": delivered,
        "statuses": {status: count for status, count, _a in rows},
        "attempts": {str(n): count for n, count in attempts},
        "exit_codes": exit_codes,
        "exactly_once": len(stats["arrivals"]) == expected == delivered and stats["bad_signatures"] == 0,
    }


def _cpu_s(consumers: Consumers) -> float:
    return procstat.total_cpu_s(procstat.tree(consumers.pids, procstat.all_processes()))


def throughput(setup: Setup, n: int, processes: int, flaky_every: int = 0) -> dict:
    ns = Namespace.fresh("alerts", setup.redis_url, setup.postgres_url)
    receiver = consumers = None
    try:
        ns.migrate()
        receiver = Receiver(setup.log_dir / f"{ns.name}.receiver.log", flaky_every)
        for start in range(0, n, CHUNK):
            _xadd(setup.client, ns.fraud_stream, [alert_document(i, "tput") for i in range(start, min(n, start + CHUNK))])
        flaky = f", one alert in {flaky_every} answered 503 twice" if flaky_every else ""
        setup.echo(f"  {n:,} alerts on {ns.fraud_stream}, delivering with {processes} process(es){flaky} ...")
        consumers = _start(setup, ns, receiver, processes, f"alerts-{processes}")
        stats = _wait_arrivals(receiver, consumers, n)
        cpu_s = _cpu_s(consumers)
        receiver_cpu_s = procstat.total_cpu_s([p for p in [procstat.read(receiver.process.pid)] if p])
        exit_codes = consumers.stop()
        consumers = None
        times = np.array(sorted(stats["arrivals"].values()))
        seconds = float(times[-1] - times[0])
        idle_s = idle_tail_s(np.array(stats["requests"]), float(times[0]), stats["last_new_request"], float(times[-1]))
        return {
            "processes": processes,
            "alerts": n,
            "seconds": round(seconds, 3),
            "idle_tail_s": round(idle_s, 3),
            "alerts_per_s": round((n - 1) / (seconds - idle_s), 1) if seconds > idle_s else None,
            "drain_alerts_per_s": round((n - 1) / seconds, 1) if seconds > 0 else None,
            "service_cpu_s": round(cpu_s, 2),
            "service_cpu_us_per_alert": round(cpu_s / n * 1e6, 1),
            "receiver_cpu_s": round(receiver_cpu_s, 2),
            "checks": _checks(ns, stats, n, exit_codes),
        }
    finally:
        if consumers is not None:
            consumers.stop(timeout=10)
        if receiver is not None:
            receiver.stop()
        ns.drop(setup.client)


def idle_tail_s(requests: np.ndarray, first: float, last_new_request: float, last: float) -> float:
    """Of the tail from ``last_new_request`` (every alert had its first attempt) to the last arrival,
    the time the service spent waiting out back-offs: the tail's length less the time its requests
    take at the rate the run made requests from the first arrival until the tail."""
    before = int(((requests >= first) & (requests <= last_new_request)).sum())
    after = int((requests > last_new_request).sum())
    if not after or not before or last_new_request <= first:
        return 0.0
    sending_s = after * (last_new_request - first) / before
    return max(0.0, last - last_new_request - sending_s)


def latency(setup: Setup, rate: float, seconds: float, warmup: float) -> dict:
    """Open loop at ``rate``: every 10 ms, the alerts due by then are XADDed in one pipeline."""
    ns = Namespace.fresh("alerts_lat", setup.redis_url, setup.postgres_url)
    receiver = consumers = None
    try:
        ns.migrate()
        receiver = Receiver(setup.log_dir / f"{ns.name}.receiver.log")
        setup.client.xgroup_create(ns.fraud_stream, GROUP, id="0", mkstream=True)
        consumers = _start(setup, ns, receiver, 1, "alerts-latency")
        _wait_joined(setup.client, ns, consumers)
        setup.echo(f"  {rate:,.0f} alerts/s for {seconds:g}s ...")
        entry_ms: dict[str, int] = {}
        sent, started = 0, time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - sent
            if due > 0:
                ids = _xadd(setup.client, ns.fraud_stream, [alert_document(i, "lat") for i in range(sent, sent + due)])
                for i, entry_id in zip(range(sent, sent + due), ids):
                    entry_ms[f"lat_{i}:bench-hook"] = int(entry_id.split("-")[0])
                sent += due
            time.sleep(0.01)
        stats = _wait_arrivals(receiver, consumers, sent)
        exit_codes = consumers.stop()
        consumers = None
        first_ms = min(entry_ms.values())
        latencies = np.array([stats["arrivals"][k] - ms / 1000.0 for k, ms in entry_ms.items() if ms >= first_ms + warmup * 1000])
        return {
            "target_rate": round(rate, 1),
            "sent": sent,
            "achieved_rate": round(sent / seconds, 1),
            "latency_ms": report.distribution_ms(latencies),
            "checks": _checks(ns, stats, sent, exit_codes),
        }
    finally:
        if consumers is not None:
            consumers.stop(timeout=10)
        if receiver is not None:
            receiver.stop()
        ns.drop(setup.client)


def _wait_joined(client: redis.Redis, ns: Namespace, consumers: Consumers, timeout: float = 60.0) -> None:
    """Until the service's consumer has made its first read: start-up stays out of the latencies."""
    deadline = time.monotonic() + timeout
    while not any(g["name"] == GROUP and g["consumers"] for g in client.xinfo_groups(ns.fraud_stream)):
        consumers.check_alive()
        if time.monotonic() > deadline:
            raise ConsumerFailed(f"fraudd alerts not consuming after {timeout:.0f}s:\n{consumers.log_tail()}")
        time.sleep(0.05)


def run(
    setup: Setup, n: int, process_counts: list[int], fraction: float, seconds: float, warmup: float, flaky_every: int
) -> dict:
    drains = {"bare client": bare_client(setup, n)}
    drains.update({str(p): throughput(setup, n, p) for p in process_counts})
    first = str(process_counts[0])
    if flaky_every:
        drains[f"{first}, flaky receiver"] = throughput(setup, n, process_counts[0], flaky_every)
    for p, d in drains.items():
        setup.echo(f"    {p}: {d['alerts_per_s']:,.0f} alerts/s, {d['service_cpu_us_per_alert']} CPU-µs/alert")
    one = drains[first]["alerts_per_s"]
    ratios = {
        f"{p}_over_bare_client": round(d["alerts_per_s"] / drains["bare client"]["alerts_per_s"], 3)
        for p, d in drains.items()
        if p != "bare client"
    }
    if flaky_every:
        flaky = drains[f"{first}, flaky receiver"]
        ratios["flaky_over_healthy"] = round(flaky["alerts_per_s"] / one, 3)
        ratios["flaky_over_healthy_drain"] = round(flaky["drain_alerts_per_s"] / drains[first]["drain_alerts_per_s"], 3)
    return {
        "alerts": n,
        "throughput": drains,
        "ratios": ratios,
        "fraction_of_max": fraction,
        "latency": latency(setup, one * fraction, seconds, warmup),
    }


def format_result(result: dict) -> str:
    rows = [
        [
            p,
            f"{d['alerts']:,}",
            f"{d['alerts_per_s']:,.0f}",
            f"{d['drain_alerts_per_s']:,.0f}",
            d["idle_tail_s"],
            d["service_cpu_us_per_alert"],
            d["receiver_cpu_s"] or "-",
            "yes" if d["checks"]["exactly_once"] else "NO",
        ]
        for p, d in result["throughput"].items()
    ]
    lat = result["latency"]
    q = lat["latency_ms"]
    return "\n".join(
        [
            "",
            "alerts delivered to a local signed-webhook receiver (prefilled fraud stream)",
            report.table(
                rows,
                [
                    "sender (fraudd alerts --workers)",
                    "alerts",
                    "alerts/s",
                    "first-to-last alerts/s",
                    "idle tail s",
                    "CPU-µs/alert",
                    "receiver CPU-s",
                    "each once",
                ],
            ),
            "ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()),
            "",
            f"delivery latency at {result['fraction_of_max']:.0%} of the 1-process rate "
            f"({lat['achieved_rate']:,.0f} alerts/s, {lat['sent']:,} sent), ms: p50 {q.get('p50')}, p95 {q.get('p95')}, "
            f"p99 {q.get('p99')}, max {q.get('max')}; each once: {'yes' if lat['checks']['exactly_once'] else 'NO'}",
        ]
    )
