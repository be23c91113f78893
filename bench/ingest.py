"""``python -m bench ingest``: `fraudd ingest` under wrk (Debian's HTTP load tool), side by side
with the ceilings it is compared to.

Phases, each on the same box, one after the other:

    single      closed loop, one fresh transaction per POST /v1/transactions: the maximum req/s
    batch       closed loop, POST /v1/transactions/batch of ``--batch-items`` fresh transactions
    paced       POST /v1/transactions at ``--fraction`` of the single maximum: latency at that load
    xadd        redis-benchmark, one XADD of the same payload per round trip (no pipelining), as
                many connections as wrk used: what a bare XADD loop moves, for the ratio
    hello       the same wrk load on a bare aiohttp server answering a fixed 202 (no validation, no
                Redis): the HTTP stack's own ceiling on this box, for the ratio
    score       with `fraudd run` scoring on the box: closed-loop POST /v1/score (the maximum),
                then paced at ``--fraction`` of it (p99 against the 50 ms goal)

wrk paces by giving each connection a fixed gap between its requests (``bench/wrk/paced.lua``),
with many connections (``PACED_CONNECTIONS``) so that a slow answer holds back only its own
connection: close to an open loop while answers are much faster than the gap. A connection waits
its gap after each answer, so the achieved rate falls short of the target by about latency/gap;
both are reported.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench import procstat
from bench.namespace import FRAUDD, Namespace

WRK_DIR = Path(__file__).resolve().parent / "wrk"
PAYLOAD = (
    '{"transaction_id":"txn_ab12","user_id":"user_x1","amount":512.3,"merchant":"Amazon",'
    '"timestamp":1764385200,"currency":"EUR","channel":"ecom"}'
)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
PACED_CONNECTIONS = 512


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return round(float(match.group(1)) * _UNITS[match.group(2)], 3)


def parse_wrk(output: str) -> dict:
    """Requests/s, latency quantiles (ms) and errors from ``wrk --latency`` output."""
    result: dict = {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", output)) else 0,
        "socket_errors": (m.group(0) if (m := re.search(r"Socket errors:.*", output)) else None),
    }
    result["latency_ms"] = {f"p{q}": _ms(v) for q, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.M)}
    return result


@dataclass(frozen=True)
class Meter:
    """CPU seconds of the server under test (its process tree), of Redis (INFO), and of the whole
    machine: per request they are steadier than rates on a box other work shares."""

    roots: list[int]
    client: redis.Redis

    def read(self) -> tuple[float, float, float]:
        info = self.client.info("cpu")
        return (
            procstat.total_cpu_s(procstat.tree(self.roots, procstat.all_processes())),
            info["used_cpu_user"] + info["used_cpu_sys"],
            procstat.machine_busy_s(),
        )

    @staticmethod
    def per_request(before: tuple, after: tuple, requests: int, items: int = 1) -> dict:
        server, redis_s, machine = (a - b for a, b in zip(after, before))
        n = max(requests * items, 1)
        return {
            "server_cpu_us": round(server / n * 1e6, 1),
            "redis_cpu_us": round(redis_s / n * 1e6, 1),
            "machine_busy_cpu_s": round(machine, 1),
        }


def wrk(
    url: str,
    path: str,
    prefix: str,
    items: int,
    seconds: float,
    connections: int,
    meter: Meter,
    threads: int = 2,
    per_connection_rate: float | None = None,
) -> dict:
    script = "paced.lua" if per_connection_rate else "transactions.lua"
    args = [path, prefix, str(items)] + ([f"{per_connection_rate:.6f}"] if per_connection_rate else [])
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(WRK_DIR / script),
        url,
        "--",
        *args,
    ]
    before = meter.read()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "FRAUDD_WRK_DIR": str(WRK_DIR)}, timeout=seconds + 60
    )
    after = meter.read()
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    # CPU per transaction (per request for single POSTs): the server's tree, Redis, and the machine.
    result["cpu_per_transaction"] = Meter.per_request(before, after, result["requests"], items)
    result["command"] = " ".join(command)
    result["load_average"] = os.getloadavg()[0]
    return result


def redis_benchmark(redis_url: str, stream: str, requests: int, connections: int) -> dict:
    host, port = re.search(r"//([^:/]+):(\d+)", redis_url).groups()
    command = [
        "redis-benchmark",
        "-h",
        host,
        "-p",
        port,
        "-n",
        str(requests),
        "-c",
        str(connections),
        "-P",
        "1",
        "-q",
        "XADD",
        stream,
        "*",
        "data",
        PAYLOAD,
    ]
    meter = Meter([], redis.Redis.from_url(redis_url))
    before = meter.read()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    after = meter.read()
    rate = float(re.findall(r"([\d.]+) requests per second", done.stdout)[-1])
    return {
        "requests_per_s": rate,
        "command": " ".join(command[:-1]) + " '<payload>'",
        "load_average": os.getloadavg()[0],
        "cpu_per_transaction": Meter.per_request(before, after, requests),
    }


@dataclass
class Process:
    """A fraudd (or helper) process in its own session, stopped with SIGTERM."""

    popen: subprocess.Popen

    @classmethod
    def start(cls, command: list[str], env: dict, log_path: Path) -> Process:
        with open(log_path, "ab") as log:
            return cls(subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


def _wait_healthy(url: str, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"process exited with {process.popen.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def _start_ingest(ns: Namespace, log_dir: Path, workers: int, *args: str) -> tuple[Process, str]:
    port = _free_port()
    process = Process.start(
        [*FRAUDD, "ingest", "--listen", f"127.0.0.1:{port}", "--workers", str(workers), *args],
        {**ns.env(), "FRAUDD_LOG_LEVEL": "WARNING"},
        log_dir / f"ingest-{ns.name}.log",
    )
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, process)
    return process, url


def _hello_server(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "bench.hello", str(port), str(workers)]


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run(
    redis_url: str,
    postgres_url: str,
    log_dir: Path,
    seconds: float,
    workers: int,
    connections: int,
    batch_items: int,
    fraction: float,
    score: bool,
    echo,
) -> dict:
    client = redis.Redis.from_url(redis_url)
    run_id = uuid.uuid4().hex[:6]
    result: dict = {
        "seconds_per_phase": seconds,
        "ingest_workers": workers,
        "connections": connections,
        "batch_items": batch_items,
        "fraction": fraction,
    }
    ns = Namespace.fresh("ingest", redis_url, postgres_url)
    ns.create_group(client)
    ingest, url = _start_ingest(ns, log_dir, workers, "--max-lag", str(10**12), "--max-batch", str(batch_items))
    meter = Meter([ingest.popen.pid], client)
    try:
        echo(f"single POSTs: wrk -c{connections} for {seconds:g}s ...")
        result["single"] = wrk(url, "/v1/transactions", f"s{run_id}", 1, seconds, connections, meter)
        echo(f"batch POSTs of {batch_items} ...")
        batch = wrk(url, "/v1/transactions/batch", f"b{run_id}", batch_items, seconds, 8, meter)
        batch["transactions_per_s"] = batch["requests_per_s"] * batch_items
        result["batch"] = batch
        target = result["single"]["requests_per_s"] * fraction
        echo(f"paced single POSTs at {target:,.0f} req/s ...")
        result["paced"] = wrk(
            url,
            "/v1/transactions",
            f"p{run_id}",
            1,
            seconds,
            PACED_CONNECTIONS,
            meter,
            per_connection_rate=target / PACED_CONNECTIONS,
        )
        result["paced"]["target_per_s"] = target
        result["written"] = client.xlen(ns.stream)
    finally:
        ingest.stop()
        ns.drop(client)

    echo("bare XADD (redis-benchmark, one command per round trip) ...")
    stream = f"bench_xadd_{run_id}:transactions:raw"
    result["xadd"] = redis_benchmark(
        redis_url, stream, int(max(100_000, result["single"]["requests_per_s"] * seconds)), connections
    )
    client.delete(stream)

    echo("bare aiohttp (a fixed 202, nothing else) ...")
    port = _free_port()
    hello = Process.start(_hello_server(port, workers), ns.env(), log_dir / "hello.log")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", hello)
        result["hello"] = wrk(
            f"http://127.0.0.1:{port}",
            "/v1/transactions",
            f"h{run_id}",
            1,
            seconds,
            connections,
            Meter([hello.popen.pid], client),
        )
    finally:
        hello.stop()

    if score:
        result["score"] = _score(redis_url, postgres_url, log_dir, seconds, workers, fraction, run_id, echo)
    single = result["single"]["requests_per_s"]
    result["ratios"] = {
        "single_over_xadd": round(single / result["xadd"]["requests_per_s"], 3),
        "single_over_bare_aiohttp": round(single / result["hello"]["requests_per_s"], 3),
    }
    return result


def _score(
    redis_url: str, postgres_url: str, log_dir: Path, seconds: float, workers: int, fraction: float, run_id: str, echo
) -> dict:
    client = redis.Redis.from_url(redis_url)
    ns = Namespace.fresh("score", redis_url, postgres_url)
    ns.migrate()
    ns.create_group(client)
    scoring = Process.start(
        [*FRAUDD, "run", "--workers", "2"], {**ns.env(), "FRAUDD_LOG_LEVEL": "WARNING"}, log_dir / f"run-{ns.name}.log"
    )
    out: dict = {}
    try:
        deadline = time.monotonic() + 60
        while len(client.xinfo_consumers(ns.stream, ns.group)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ingest, url = _start_ingest(ns, log_dir, workers, "--decision-timeout-ms", "1000")
        # The scoring workers' CPU counts too: a decision costs both.
        meter = Meter([ingest.popen.pid, scoring.popen.pid], client)
        try:
            echo("POST /v1/score, closed loop ...")
            out["max"] = wrk(url, "/v1/score", f"m{run_id}", 1, seconds, 64, meter)
            time.sleep(1.0)  # tallies reach /metrics within half a second
            out["max"]["timed_out"] = _metric(url, 'fraudd_ingest_decisions_total{outcome="timed_out"}')
            target = out["max"]["requests_per_s"] * fraction
            echo(f"POST /v1/score paced at {target:,.0f} req/s ...")
            before = _metric(url, 'fraudd_ingest_decisions_total{outcome="timed_out"}')
            out["paced"] = wrk(
                url,
                "/v1/score",
                f"q{run_id}",
                1,
                seconds,
                PACED_CONNECTIONS,
                meter,
                per_connection_rate=target / PACED_CONNECTIONS,
            )
            out["paced"]["target_per_s"] = target
            time.sleep(1.0)
            out["paced"]["timed_out"] = _metric(url, 'fraudd_ingest_decisions_total{outcome="timed_out"}') - before
        finally:
            ingest.stop()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            groups = {g["name"].decode(): g for g in client.xinfo_groups(ns.stream)}
            if groups[ns.group]["pending"] == 0 and groups[ns.group].get("lag") == 0:
                break
            time.sleep(0.5)
        ((rows, distinct),) = ns.sql("SELECT count(*), count(DISTINCT transaction_id) FROM transactions")
        out["stream_entries"], out["rows"], out["distinct_rows"] = client.xlen(ns.stream), rows, distinct
    finally:
        scoring.stop()
        ns.drop(client)
    return out


def _cpu(phase: dict) -> str:
    c = phase["cpu_per_transaction"]
    return f"CPU-µs/tx: server {c['server_cpu_us']}, redis {c['redis_cpu_us']}; machine busy {c['machine_busy_cpu_s']} CPU-s"


def format_result(result: dict) -> str:
    s, b, p, x, h = result["single"], result["batch"], result["paced"], result["xadd"], result["hello"]
    lines = [
        "",
        f"fraudd ingest, {result['ingest_workers']} processes, {result['seconds_per_phase']:g} s per phase",
        f"  single POST        {s['requests_per_s']:>10,.0f} req/s   p50 {s['latency_ms'].get('p50')} ms  "
        f"p99 {s['latency_ms'].get('p99')} ms  non-2xx {s['non_2xx']}  (load avg {s['load_average']:.1f})",
        f"                     {_cpu(s)}",
        f"  batch of {result['batch_items']:<4}      {b['transactions_per_s']:>10,.0f} tx/s    "
        f"({b['requests_per_s']:,.1f} req/s, p99 {b['latency_ms'].get('p99')} ms, non-2xx {b['non_2xx']})",
        f"                     {_cpu(b)}",
        f"  paced at {result['fraction']:.0%}        {p['requests_per_s']:>10,.0f} req/s   p50 {p['latency_ms'].get('p50')} ms  "
        f"p99 {p['latency_ms'].get('p99')} ms  (target {p['target_per_s']:,.0f})",
        f"  bare XADD          {x['requests_per_s']:>10,.0f} /s      (redis-benchmark -P 1)   {_cpu(x)}",
        f"  bare aiohttp 202   {h['requests_per_s']:>10,.0f} req/s   {_cpu(h)}",
        f"  ratios: single POST / bare XADD {result['ratios']['single_over_xadd']}, "
        f"single POST / bare aiohttp {result['ratios']['single_over_bare_aiohttp']}",
    ]
    if "score" in result:
        m, q = result["score"]["max"], result["score"]["paced"]
        lines += [
            f"  /v1/score max      {m['requests_per_s']:>10,.0f} req/s   p50 {m['latency_ms'].get('p50')} ms  "
            f"p99 {m['latency_ms'].get('p99')} ms  timed out {m['timed_out']:.0f}",
            f"                     {_cpu(m)} (server: ingest and fraudd run)",
            f"  /v1/score paced    {q['requests_per_s']:>10,.0f} req/s   p50 {q['latency_ms'].get('p50')} ms  "
            f"p99 {q['latency_ms'].get('p99')} ms  timed out {q['timed_out']:.0f}  (target {q['target_per_s']:,.0f})",
            f"  scored: {result['score']['rows']:,} rows, {result['score']['distinct_rows']:,} distinct, "
            f"{result['score']['stream_entries']:,} stream entries",
        ]
    return "\n".join(lines)
