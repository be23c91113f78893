"""``fraudd demo``: the whole system on generated traffic, from HTTP ingest to delivered alerts.

Generated transactions (with producer duplicates and invalid items mixed in) are POSTed in batches
to a real ``fraudd ingest``; a real ``fraudd run`` scores them; a real ``fraudd alerts`` delivers
every fraud alert as a signed webhook to a receiver the demo runs. A progress line shows the flow;
the summary reads the outcome back from PostgreSQL, the streams and the receiver, and checks it
against what was sent.

It uses the servers at ``REDIS_URL`` / ``POSTGRES_URL`` when they answer, and otherwise starts
throwaway ones in a temporary directory. Everything it starts is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import numpy as np
import orjson
import psycopg
import redis
from aiohttp import web

from .generator import GeneratorConfig, TransactionGenerator
from .localservers import MissingServer, PostgresServer, RedisServer, free_port, scratch_dir
from .namespace import Namespace

DEMO_NAME = "fraudd_demo"
HTTP_BATCH = 500
HTTP_SENDERS = 4
_ECHO = Callable[[str], None]


@dataclass
class DemoResult:
    sent: int
    duplicates_sent: int
    invalid_sent: int
    rejected_at_ingest: dict[str, int]
    rows: int
    decisions: dict[str, int]
    dead_letters: dict[str, int]
    alerts: int
    alerts_delivered: int
    alerts_redelivered: int
    pending: int
    seconds: float
    latency_p50_ms: float
    latency_p99_ms: float
    fraud_injected: int
    fraud_caught: int
    false_alarms: int
    exit_codes: dict[str, int]
    where: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def consistent(self) -> bool:
        expected_rows = self.sent - self.duplicates_sent - self.invalid_sent
        return (
            self.rows == expected_rows
            and sum(self.rejected_at_ingest.values()) == self.invalid_sent
            and self.pending == 0
            and self.alerts_delivered == self.alerts
            and self.alerts_redelivered == 0
            and all(code == 0 for code in self.exit_codes.values())
        )


# -- servers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _servers(redis_url: str, postgres_url: str, echo: _ECHO) -> Iterator[tuple[str, str, bool]]:
    """(Redis URL, PostgreSQL URL, throwaway?): the configured servers when both answer, else new ones."""
    if _redis_answers(redis_url) and _postgres_answers(postgres_url):
        yield redis_url, postgres_url, False
        return
    directory = scratch_dir("fraudd-demo-")
    (directory / "pg").mkdir()
    redis_server = RedisServer(directory, persistent=False)
    postgres = PostgresServer(directory / "pg")
    try:
        echo(f"{redis_url} or {postgres_url} does not answer: starting throwaway servers in {directory}")
        redis_server.start()
        postgres.init()
        postgres.start()
        yield redis_server.url, postgres.url, True
    except MissingServer as exc:
        raise SystemExit(f"Error: {exc}; install it, or point REDIS_URL / POSTGRES_URL at running servers") from None
    finally:
        postgres.stop()
        redis_server.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            return bool(client.ping())
    except (redis.RedisError, ValueError):
        return False


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


# -- the webhook receiver --------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP endpoint receiving the alert webhooks: it checks each signature and counts ids."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.port = free_port()
        self.received: Counter[str] = Counter()
        self.bad_signatures = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        timestamp = request.headers.get("webhook-timestamp", "")
        expected = base64.b64encode(
            hmac.new(self._secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        ).decode()
        given = [part.split(",", 1)[-1] for part in request.headers.get("webhook-signature", "").split()]
        if not any(hmac.compare_digest(expected, signature) for signature in given):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.received[webhook_id] += 1
        return web.Response(status=204)


# -- the processes ---------------------------------------------------------------------------


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]


class _Processes:
    """``fraudd`` services started by the demo, each in its own session with its log in a file."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self._directory = directory
        self._env = env
        self.started: list[_Process] = []

    def start(self, name: str, *args: str) -> _Process:
        log_path = self._directory / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fraudd", *args], env=self._env, stdout=log, stderr=log, start_new_session=True
            )
        process = _Process(name, popen, log_path)
        self.started.append(process)
        return process

    def check_alive(self) -> None:
        for process in self.started:
            if process.popen.poll() is not None:
                raise RuntimeError(f"fraudd {process.name} exited early with {process.popen.returncode}:\n{process.tail()}")

    def stop(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM (graceful) to each, SIGKILL to what is still alive after ``timeout``; exit codes."""
        for process in self.started:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        codes = {}
        for process in self.started:
            try:
                codes[process.name] = process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.popen.pid, signal.SIGKILL)
                codes[process.name] = process.popen.wait(timeout=30)
        return codes


# -- the run ---------------------------------------------------------------------------------


def run_demo(
    redis_url: str, postgres_url: str, transactions: int, workers: int, seed: int, echo: _ECHO, console: bool = False
) -> DemoResult:
    """Run the demo and print its summary; with ``console``, then serve the analyst console on its cases until Ctrl-C."""
    with contextlib.ExitStack() as stack:
        redis_url, postgres_url, throwaway = stack.enter_context(_servers(redis_url, postgres_url, echo))
        directory = scratch_dir("fraudd-demo-run-")
        stack.callback(shutil.rmtree, directory, True)
        client = redis.Redis.from_url(redis_url, protocol=2)
        demo = Namespace(DEMO_NAME, redis_url, postgres_url)
        demo.drop(client)  # what an earlier demo left: every run starts from nothing

        api_key = secrets.token_urlsafe(24)
        (directory / "api-keys").write_text(api_key + "\n")
        webhook_secret = secrets.token_bytes(24)
        receiver = stack.enter_context(WebhookReceiver(webhook_secret))
        (directory / "alerts.toml").write_text(_ALERTS_CONFIG.format(url=receiver.url))
        ingest_port = free_port()
        env = dict(
            os.environ,
            **demo.environment(),
            FRAUDD_API_KEYS_FILE=str(directory / "api-keys"),
            FRAUDD_DEMO_WEBHOOK_SECRET="whsec_" + base64.b64encode(webhook_secret).decode(),
            FRAUDD_LOG_LEVEL="WARNING",
        )
        migrated = subprocess.run([sys.executable, "-m", "fraudd", "migrate"], env=env, capture_output=True, text=True)
        if migrated.returncode != 0:
            raise RuntimeError(f"fraudd migrate failed:\n{migrated.stderr[-2000:]}")

        traffic = _traffic(transactions, seed)
        processes = _Processes(directory, env)
        echo(
            f"starting fraudd run --workers {workers}, fraudd ingest on 127.0.0.1:{ingest_port}, fraudd alerts "
            f"(webhooks to {receiver.url}); logs in {directory}"
        )
        processes.start("run", "run", "--workers", str(workers))
        processes.start("ingest", "ingest", "--workers", "1", "--listen", f"127.0.0.1:{ingest_port}")
        processes.start("alerts", "alerts", "--config", str(directory / "alerts.toml"), "--workers", "1", "--from-beginning")
        exit_codes: dict[str, int] = {}
        try:
            _wait_for_ingest(ingest_port, processes)
            echo(
                f"sending {len(traffic.payloads):,} transactions over HTTP ({traffic.duplicates:,} producer duplicates, "
                f"{traffic.invalid:,} invalid) in batches of {HTTP_BATCH}"
            )
            progress = _Progress(client, demo, receiver)
            started = time.time()
            rejected = _send(traffic.payloads, f"http://127.0.0.1:{ingest_port}", api_key, processes, progress)
            while not _settled(client, demo, receiver):
                processes.check_alive()
                progress()
                time.sleep(0.1)
            echo("")
        finally:
            exit_codes = processes.stop()
        result = _summary(client, demo, traffic, rejected, receiver, exit_codes, started)
        result.where = _where(demo, throwaway)
        echo(format_summary(result))
        if console:
            _offer_console(directory, env, result.decisions["review"], echo)
        else:
            echo("  console: `fraudd demo --console` serves the analyst console on the demo's cases at the end")
        return result


@dataclass
class _Traffic:
    payloads: list[bytes]
    transaction_ids: np.ndarray
    is_fraud: np.ndarray
    duplicates: int
    invalid: int


def _traffic(transactions: int, seed: int) -> _Traffic:
    rate = 2.0  # event-time transactions per second: the traffic spans the hours before now
    config = GeneratorConfig(seed=seed, start_ts=time.time() - transactions / rate, tx_per_second=rate)
    generated = TransactionGenerator(config).generate(transactions)
    faulty = generated.with_faults(duplicate_rate=0.01, invalid_rate=0.005, rng=np.random.default_rng(seed))
    # The HTTP API takes JSON: a payload that is not even UTF-8 cannot be a JSON array item.
    kept = [(p, r) for p, r in zip(faulty.payloads, faulty.reason) if p is not None and _json_item(p)]
    return _Traffic(
        payloads=[p for p, _r in kept],
        transaction_ids=np.asarray(generated.transaction_id),
        is_fraud=np.asarray(generated.is_fraud),
        duplicates=int(faulty.is_duplicate.sum()),
        invalid=sum(1 for _p, r in kept if r is not None),
    )


def _json_item(payload: bytes) -> bool:
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return True


def _wait_for_ingest(port: int, processes: _Processes, timeout: float = 60.0) -> None:
    _wait_for_http(f"http://127.0.0.1:{port}/healthz", "fraudd ingest", processes, timeout)


def _wait_for_http(url: str, what: str, processes: _Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s")


def _offer_console(directory: Path, env: dict[str, str], review_cases: int, echo: _ECHO) -> None:
    """Serve ``fraudd console`` on the demo's cases, with a lead ``demo`` whose password is printed,
    until Ctrl-C."""
    password = secrets.token_urlsafe(12)
    (directory / "console-password").write_text(password + "\n")
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudd",
            "users",
            "add",
            "demo",
            "--role",
            "lead",
            "--password-file",
            str(directory / "console-password"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        raise RuntimeError(f"fraudd users add failed:\n{added.stderr[-2000:]}")
    port = free_port()
    processes = _Processes(directory, env)
    processes.start("console", "console", "--workers", "1", "--listen", f"127.0.0.1:{port}")
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/login", "fraudd console", processes)
        echo(
            f"\nconsole: http://127.0.0.1:{port}/  sign in as demo / {password} (a lead) to work the "
            f"{review_cases:,} review cases; Ctrl-C stops the demo"
        )
        while True:
            processes.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        echo("")
    finally:
        processes.stop()


def _send(
    payloads: list[bytes], base_url: str, api_key: str, processes: _Processes, progress: Callable[[], None]
) -> dict[str, int]:
    """POST every payload in batches from a few concurrent senders; the rejected items by reason."""
    return asyncio.run(_send_all(payloads, base_url, api_key, processes, progress))


async def _send_all(
    payloads: list[bytes], base_url: str, api_key: str, processes: _Processes, progress: Callable[[], None]
) -> dict[str, int]:
    batches = [payloads[i : i + HTTP_BATCH] for i in range(0, len(payloads), HTTP_BATCH)]
    queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    rejected: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    async def sender(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            body = b"[" + b",".join(batch) + b"]"
            while True:
                async with session.post(f"{base_url}/v1/transactions/batch", data=body, headers=headers) as response:
                    if response.status == 503:  # backpressure: the scoring group lags; come back later
                        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                        continue
                    reply = await response.json()
                    if response.status >= 300:
                        raise RuntimeError(f"fraudd ingest answered {response.status}: {reply}")
                    break
            for item in reply["results"]:
                if item["status"] >= 400:
                    rejected[item["error"]] += 1

    async def reporter() -> None:
        while True:
            processes.check_alive()
            progress()
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession() as session:
        report = asyncio.create_task(reporter())
        try:
            await asyncio.gather(*(sender(session) for _ in range(HTTP_SENDERS)))
        finally:
            report.cancel()
    return dict(rejected)


class _Progress:
    """The live line: scored, tx/s since the last line, lag, alerts written and delivered.

    On a terminal it rewrites itself twice a second; into a file or pipe it is a line every 2 s.
    """

    def __init__(self, client: redis.Redis, demo: Namespace, receiver: WebhookReceiver) -> None:
        self._client, self._demo, self._receiver = client, demo, receiver
        self._tty = sys.stdout.isatty()
        self._last = (time.monotonic(), 0)

    def __call__(self) -> None:
        now, (then, scored_then) = time.monotonic(), self._last
        if now - then < (0.5 if self._tty else 2.0):
            return
        scored = self._demo.sql("SELECT count(*) FROM transactions")[0][0]
        self._last = (now, scored)
        line = (
            f"  scored {scored:>9,}  {(scored - scored_then) / (now - then):>8,.0f} tx/s   "
            f"lag {_lag(self._client, self._demo):>7,}   alerts {self._client.xlen(self._demo.fraud_stream):>6,}   "
            f"delivered {len(self._receiver.received):>6,}"
        )
        sys.stdout.write(f"\r{line}" if self._tty else f"{line}\n")
        sys.stdout.flush()


def _lag(client: redis.Redis, demo: Namespace) -> int:
    """Entries of the input stream the scoring has not yet read and acked; all of them while its
    group does not exist yet (``fraudd run`` still starting), so a demo never settles before scoring."""
    if not client.exists(demo.stream):
        return 0
    groups = [g for g in client.xinfo_groups(demo.stream) if g["name"] == demo.group.encode()]
    if not groups:
        return client.xlen(demo.stream)
    return sum(int(g.get("lag") or 0) + int(g["pending"]) for g in groups)


def _settled(client: redis.Redis, demo: Namespace, receiver: WebhookReceiver) -> bool:
    """Every entry scored and acked, and every alert delivered."""
    if _lag(client, demo) > 0:
        return False
    return len(receiver.received) >= client.xlen(demo.fraud_stream)


def _summary(
    client: redis.Redis,
    demo: Namespace,
    traffic: _Traffic,
    rejected: dict[str, int],
    receiver: WebhookReceiver,
    exit_codes: dict[str, int],
    started: float,
) -> DemoResult:
    decisions = dict(demo.sql("SELECT decision, count(*) FROM transactions GROUP BY 1"))
    last, p50, p99 = demo.sql(
        "SELECT max(scored_at), "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency), percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) "
        "FROM (SELECT scored_at, extract(epoch FROM scored_at) * 1000 - split_part(stream_id, '-', 1)::bigint AS latency "
        "FROM transactions) t"
    )[0]
    flagged = {txid for (txid,) in demo.sql("SELECT transaction_id FROM transactions WHERE decision <> 'approve'")}
    fraud_ids = set(traffic.transaction_ids[traffic.is_fraud].tolist())
    caught = len(fraud_ids & flagged)
    dead = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(demo.dlq_stream))  # the client does not decode
    reasons = Counter(fields[b"reason"].decode() for _id, fields in dead)
    return DemoResult(
        sent=len(traffic.payloads),
        duplicates_sent=traffic.duplicates,
        invalid_sent=traffic.invalid,
        rejected_at_ingest=rejected,
        rows=sum(decisions.values()),
        decisions={name: decisions.get(name, 0) for name in ("approve", "review", "decline")},
        dead_letters=dict(reasons),
        alerts=client.xlen(demo.fraud_stream),
        alerts_delivered=len(receiver.received),
        alerts_redelivered=sum(count - 1 for count in receiver.received.values()),
        pending=client.xpending(demo.stream, demo.group)["pending"],
        seconds=last.timestamp() - started if last else 0.0,
        latency_p50_ms=float(p50 or 0.0),
        latency_p99_ms=float(p99 or 0.0),
        fraud_injected=len(fraud_ids),
        fraud_caught=caught,
        false_alarms=len(flagged - fraud_ids),
        exit_codes=exit_codes,
    )


def _where(demo: Namespace, throwaway: bool) -> list[str]:
    if throwaway:
        return ["rows and streams were on throwaway servers, removed with the demo; set REDIS_URL / POSTGRES_URL to keep them"]
    return [
        f"rows:    psql {demo.postgres_url} -c 'SELECT * FROM {demo.schema}.transactions LIMIT 5'",
        f"streams: redis-cli -u {demo.redis_url} XLEN {demo.fraud_stream}",
        "metrics: each service serves /metrics and /healthz with --metrics-port; grafana/ holds the dashboard",
    ]


def format_summary(result: DemoResult) -> str:
    rejected = ", ".join(f"{r} {c}" for r, c in sorted(result.rejected_at_ingest.items())) or "none"
    recall = result.fraud_caught / result.fraud_injected if result.fraud_injected else 0.0
    rows = [
        (
            "transactions scored",
            f"{result.rows:,}  (sent {result.sent:,} = scored + {result.duplicates_sent:,} duplicates "
            f"+ {result.invalid_sent:,} invalid)",
        ),
        ("throughput", f"{result.rate:,.0f} transactions/s (first HTTP request to last decision, {result.seconds:.1f} s)"),
        (
            "latency",
            f"p50 {result.latency_p50_ms:,.0f} ms, p99 {result.latency_p99_ms:,.0f} ms (stream entry to decision; "
            "the traffic arrives as fast as HTTP takes it, so this includes queueing)",
        ),
        ("decisions", ", ".join(f"{name} {count:,}" for name, count in result.decisions.items())),
        (
            "fraud",
            f"injected {result.fraud_injected:,}, caught {result.fraud_caught:,} ({recall:.1%}), "
            f"false alarms {result.false_alarms:,}",
        ),
        (
            "alerts",
            f"{result.alerts:,} on {DEMO_NAME}:transactions:fraud, {result.alerts_delivered:,} delivered "
            f"as signed webhooks, {result.alerts_redelivered} twice",
        ),
        ("rejected at ingest", rejected),
        ("dead letters", ", ".join(f"{r} {c}" for r, c in sorted(result.dead_letters.items())) or "none"),
        ("pending after drain", str(result.pending)),
        ("exit codes", ", ".join(f"{name} {code}" for name, code in result.exit_codes.items())),
        (
            "check",
            "every transaction scored exactly once, every alert delivered once"
            if result.consistent
            else "MISMATCH: see the counts above",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "fraudd demo summary", *(f"  {name:<{width}}  {value}" for name, value in rows)]
    lines += [f"  {line}" for line in result.where]
    return "\n".join(lines)


_ALERTS_CONFIG = """\
# Written by fraudd demo: every review and decline goes to the demo's webhook receiver (local, plain http).
[[channels]]
name = "demo-webhook"
kind = "webhook"
url = "{url}"
allow_insecure = true
secret_env = "FRAUDD_DEMO_WEBHOOK_SECRET"
decisions = ["review", "decline"]
"""
