"""Observability end to end: a real Prometheus scrapes a real ``fraudd run`` under load.

What operators rely on is checked where it is used: every query of the Grafana dashboard and
every alerting rule is sent to that Prometheus and must return data, so a renamed metric or label
breaks this test instead of an on-call night. Also: the exposition passes ``promtool check
metrics``, a dead worker's counts survive it (and its files do not pile up), ``/healthz`` says 200
or 503 with the reason, and the logs are JSON lines whose volume does not grow with traffic.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.ingest import Publisher

from .conftest import FRAUDD, REDIS_URL, Daemon, Namespace, migrate, wait_for, worker_pids
from .streams import fully_drained

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = GRAFANA / "fraudd-dashboard.json"
RULES = GRAFANA / "prometheus-rules.yml"
JOB = "fraudd"  # the job name the rules' FrauddTargetDown and the README's scrape config use
VALID = 30_000
INVALID = [b"not json at all", b"[1, 2, 3]", b'{"user_id": "u", "amount": 3.0, "merchant": "m", "timestamp": 1764385200}']
INVALID_EVERY = 100  # one invalid entry after every 100 valid ones: 300 dead letters, spread over batches
WORKERS = 2
# What Grafana puts in place of the dashboard's variables: the job, every instance, and a rate
# window long enough to span the load (it is over within seconds).
VARIABLES = {"$__rate_interval": "1m", "$instance": ".+", "$job": JOB}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Observed:
    """A daemon that has scored the load, the Prometheus that scraped it, and where to look."""

    ns: Namespace
    daemon: Daemon
    metrics_url: str
    prometheus_url: str
    metrics_dir: Path
    stderr_path: Path
    # /metrics just before one worker was SIGKILLed (the stream drained), and once it was respawned.
    before_restart: dict[str, float] = field(default_factory=dict)
    after_restart: dict[str, float] = field(default_factory=dict)
    dead_pid: int = 0

    def query(self, expr: str) -> dict:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        assert status in (200, 400, 422), f"{expr}: HTTP {status}"
        return json.loads(body)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list[dict]:
        """The alerting rules as the Prometheus under test loaded them from ``RULES``."""
        groups = json.loads(http_get(f"{self.prometheus_url}/api/v1/rules")[1])["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def scrape(self) -> dict[str, float]:
        """Every sample of ``/metrics``, keyed by name and labels as exposed."""
        status, text = http_get(self.metrics_url)
        assert status == 200
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def _start_prometheus(workdir: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
            }
        )
    )
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def _load() -> list[bytes]:
    valid = (
        TransactionGenerator(GeneratorConfig(seed=11, start_ts=time.time() - 6 * 3600, tx_per_second=2.0))
        .generate(VALID)
        .payloads()
    )
    mixed = []
    for i, payload in enumerate(valid):
        mixed.append(payload)
        if i % INVALID_EVERY == INVALID_EVERY - 1:
            mixed.append(INVALID[i // INVALID_EVERY % len(INVALID)])
    return mixed


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    """Score the load under a scraping Prometheus, then kill one worker once everything is drained."""
    client = redis.Redis.from_url(REDIS_URL, protocol=2)
    ns = Namespace(f"t{uuid.uuid4().hex[:10]}")
    workdir = Path(tempfile.mkdtemp(prefix="fraudd-observability-"))
    daemon = prometheus = None
    try:
        migrate(ns)
        metrics_port = free_port()
        metrics_dir = workdir / "metrics"
        stderr_path = workdir / "fraudd.stderr"
        with open(stderr_path, "wb") as stderr:
            daemon = Daemon(
                subprocess.Popen(
                    [FRAUDD, "run", "--workers", str(WORKERS), "--metrics-port", str(metrics_port)],
                    env=ns.env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)),
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            )
        prometheus, prometheus_url = _start_prometheus(workdir, metrics_port)
        base = f"http://127.0.0.1:{metrics_port}"
        o = Observed(ns, daemon, f"{base}/metrics", prometheus_url, metrics_dir, stderr_path)
        wait_for(
            lambda: http_get(f"{base}/healthz")[0] == 200 or daemon.process.poll() is not None,
            30,
            message="/healthz to answer 200",
        )
        assert daemon.process.poll() is None, stderr_path.read_text()[-3000:]
        # Scraping before the load starts, so that rates span it (the load is over in seconds).
        wait_for(lambda: http_get(f"{prometheus_url}/-/ready")[0] == 200, 15, message="Prometheus to be ready")
        idle_samples = f'count_over_time(fraudd_transactions_total{{job="{JOB}",decision="approve"}}[1m])'
        wait_for(lambda: (o.value(idle_samples) or 0) >= 2, 15, interval=0.2, message="Prometheus to scrape the idle daemon")

        Publisher(client, ns.stream).publish(_load())
        wait_for(lambda: fully_drained(client, ns), 45, interval=0.2, message="the load to be scored")

        # A worker's death must not lose its counts, nor leave its files behind.
        before = o.scrape()
        dead = worker_pids(daemon.process.pid)[0]
        os.kill(dead, signal.SIGKILL)
        respawned = {"fraudd_worker_restarts_total{}": 1.0, "fraudd_workers_alive{}": WORKERS}
        wait_for(lambda: respawned.items() <= o.scrape().items(), 15, message="the worker to be respawned")
        o.before_restart, o.after_restart, o.dead_pid = before, o.scrape(), dead

        # Prometheus has the final state once it has scraped the restart and every scored transaction.
        wait_for(
            lambda: (
                o.value(f'sum(fraudd_worker_restarts_total{{job="{JOB}"}})') == 1.0
                and o.value(f'sum(fraudd_transactions_total{{job="{JOB}"}})') == VALID
            ),
            15,
            interval=0.5,
            message="Prometheus to scrape the final counts",
        )
        yield o
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=15)
        if daemon is not None:
            try:
                daemon.stop(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        ns.drop(client)
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _dashboard_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        if panel["type"] == "row":
            yield from _dashboard_panels(panel.get("panels", []))
        else:
            yield panel


def _substitute(expr: str) -> str:
    for variable, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value).replace("${" + variable[1:] + "}", value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


_MATCHERS_AND_STRINGS = re.compile(r'(\{[^}]*\}|"(?:[^"\\]|\\.)*")')
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)\s*")


def every_series_compared(expr: str) -> str:
    """``expr`` with each comparison turned into a ``bool`` one, outside label matchers and strings.

    An alert expression returns only the series that breach its threshold, so "no data" is what a
    healthy system gives; with ``bool`` it returns every series it compares, with 0 or 1, so "no
    data" then means a metric or label that does not exist.
    """
    parts = _MATCHERS_AND_STRINGS.split(expr)
    return "".join(part if i % 2 else _COMPARISON.sub(r"\1 bool ", part) for i, part in enumerate(parts))


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in _dashboard_panels(dashboard["panels"]) for target in panel["targets"]]


def test_queries_name_only_metrics_that_fraudd_defines(observed: Observed) -> None:
    # Data proves a name right, except behind `or vector(0)` (alert deliveries, errors): check
    # every name against the metrics fraudd defines, samples or not.
    from prometheus_client import REGISTRY

    from fraudd.console import metrics as console_metrics  # noqa: F401 -- the console's, too
    from fraudd.runtime import metrics  # noqa: F401 -- registers fraudd's metrics in this process

    defined = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("fraudd_")
        for suffix in ("", "_total", "_bucket", "_sum", "_count")
    }
    exprs = _dashboard_exprs() + [rule["query"] for rule in observed.rules()]
    used = {name for expr in exprs for name in re.findall(r"\bfraudd_\w+", expr)}
    assert "fraudd_alert_deliveries_total" in used
    assert used <= defined, used - defined


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_dashboard_panels(dashboard["panels"]))
    assert len(panels) >= 12
    failures = []
    for panel in panels:
        # Every panel follows the dashboard's data-source variable, so import and provisioning both work.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = _substitute(target["expr"])
            answer = observed.query(expr)
            if answer["status"] != "success" or not answer["data"]["result"]:
                failures.append(f"{panel['title']}: {expr}: {answer.get('error') or 'no data'}")
    assert not failures, "\n".join(failures)


def test_dashboard_variables_find_the_daemon(observed: Observed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    expected = {"job": JOB, "instance": urllib.parse.urlsplit(observed.metrics_url).netloc}
    for name, value in expected.items():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"]["query"])
        assert match and match.group(2) == name
        selector = _substitute(match.group(1))
        url = f"{observed.prometheus_url}/api/v1/label/{name}/values?" + urllib.parse.urlencode({"match[]": selector})
        values = json.loads(http_get(url)[1])["data"]
        assert value in values, (name, selector, values)


def test_every_rule_expression_is_valid_and_sees_data(observed: Observed) -> None:
    rules = observed.rules()
    assert {rule["name"] for rule in rules} >= {
        "FrauddTargetDown",
        "FrauddDependencyDown",
        "FrauddLagGrowing",
        "FrauddNotScoring",
        "FrauddDeadLetterSpike",
        "FrauddWorkerRestarts",
        "FrauddLatencyOverBudget",
        "FrauddAlertDeliveriesFailing",
        "FrauddConsoleSlaBreached",
    }
    failures = []
    for rule in rules:
        answer = observed.query(rule["query"])
        if answer["status"] != "success":
            failures.append(f"{rule['name']}: {answer.get('error')}")
            continue
        compared = every_series_compared(rule["query"])
        if not observed.query(compared)["data"]["result"]:
            failures.append(f"{rule['name']}: no data for {compared}")
    assert not failures, "\n".join(failures)
    # Prometheus itself evaluates them every second: none may fail there either.
    wait_for(
        lambda: all(rule["health"] == "ok" for rule in observed.rules()),
        10,
        message=f"rules to evaluate without error: {[(r['name'], r['health'], r.get('lastError')) for r in observed.rules()]}",
    )


def test_exposition_follows_prometheus_conventions(observed: Observed) -> None:
    _status, text = http_get(observed.metrics_url)
    lint = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    names = {family.name for family in text_string_to_metric_families(text)}
    assert all(name.startswith("fraudd_") for name in names), names


def test_a_dead_workers_counts_survive_and_its_files_go(observed: Observed) -> None:
    before, after = observed.before_restart, observed.after_restart
    counters = [
        key
        for key in before
        if key.startswith(("fraudd_transactions_total", "fraudd_dead_letters_total"))
        or re.match(r"fraudd_\w+_(count|sum|bucket)\{", key)
    ]
    assert counters
    # Nothing was scored in between (the stream was drained), so every total must be exactly equal.
    changed = {key: (before[key], after.get(key)) for key in counters if after.get(key) != before[key]}
    assert not changed, changed
    assert after['fraudd_transactions_total{"decision": "approve"}'] > 0
    assert sum(v for k, v in after.items() if k.startswith("fraudd_transactions_total")) == VALID
    assert sum(v for k, v in after.items() if k.startswith("fraudd_dead_letters_total")) == VALID // INVALID_EVERY
    files = sorted(p.name for p in observed.metrics_dir.iterdir())
    assert not [f for f in files if f"_{observed.dead_pid}." in f], files
    assert {"counter_archive.db", "histogram_archive.db"} <= set(files)
    assert after["fraudd_workers_alive{}"] == WORKERS


def test_end_to_end_latency_is_observed_once_per_scored_transaction(observed: Observed) -> None:
    after = observed.after_restart
    count = after["fraudd_end_to_end_latency_seconds_count{}"]
    assert count == VALID
    # Commit time minus the stream id's time: positive, and within the test's own span.
    assert 0 < after["fraudd_end_to_end_latency_seconds_sum{}"] / count < 60


def test_healthz_is_200_while_healthy(observed: Observed) -> None:
    status, body = http_get(observed.metrics_url.replace("/metrics", "/healthz"))
    assert (status, body) == (200, "ok\n")


def test_healthz_is_503_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fraudd.cli import run
    from fraudd.runtime.health import HealthServer
    from fraudd.runtime.supervisor import Supervisor
    from fraudd.scoring.settings import ScoringSettings
    from fraudd.scoring.worker import service

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    port = free_port()
    context = run.make_context(
        "run",
        [
            "--metrics-port",
            str(port),
            "--redis-url",
            REDIS_URL,
            "--postgres-url",
            "postgresql://127.0.0.1:1/test",
            "--workers",
            "2",
        ],
    )
    settings = ScoringSettings.from_params(context.params)
    supervisor = Supervisor(service(settings))
    probes = []

    def probe():
        probes.append(time.monotonic())
        return supervisor.health_problems()

    server = HealthServer(settings.metrics.listen, probe)
    server.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _i: http_get(f"http://127.0.0.1:{port}/healthz"), range(40)))
    finally:
        server.stop()
    # Generic words, the same for all; the error text (address, port) is for the log only.
    assert set(answers) == {(503, "postgres: unavailable\nworkers: 0 of 2 ready\n")}
    # One probe (one PostgreSQL connection) a second, however many ask at once.
    assert len(probes) <= probes[-1] - probes[0] + 1, probes


@pytest.mark.parametrize(
    ("args", "everywhere"),
    [
        (["--metrics-port", "{port}"], False),
        (["--metrics-listen", "127.0.0.1:{port}"], False),
        (["--metrics-listen", ":{port}"], True),
    ],
)
def test_metrics_and_healthz_listen_on_loopback_unless_told_otherwise(
    args: list[str], everywhere: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fraudd.cli import run
    from fraudd.runtime.health import HealthServer
    from fraudd.scoring.settings import ScoringSettings

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert ScoringSettings.from_params(run.make_context("run", []).params).metrics.listen is None  # off by default
    port = free_port()
    settings = ScoringSettings.from_params(run.make_context("run", [arg.format(port=port) for arg in args]).params)
    server = HealthServer(settings.metrics.listen, lambda: [])
    server.start()
    try:
        assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        # 127.0.0.2 is this host too, but not the address a loopback-only socket is bound to.
        assert http_get(f"http://127.0.0.2:{port}/healthz") == ((200, "ok\n") if everywhere else (0, ""))
    finally:
        server.stop()


def test_logs_are_json_lines_that_do_not_grow_with_traffic(observed: Observed) -> None:
    lines = [line for line in observed.stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"time", "level", "logger", "worker", "event", "message"} <= record.keys(), record
    workers = {record["worker"] for record in records}
    assert {"supervisor", f"{observed.ns.name}-c-0", f"{observed.ns.name}-c-1"} <= workers
    started = [r for r in records if r["event"] == "worker_started"]
    assert started and all(r["consumer"] == r["worker"] for r in started)  # extra= fields are keys of their own
    # 30,000 transactions and 300 dead letters: INFO is lifecycle only, dead letters a line per batch at most.
    assert sum(1 for r in records if r["level"] == "INFO") < 20, [r["event"] for r in records]
    dead_lettered = [r for r in records if r["event"] == "dead_lettered"]
    assert dead_lettered and sum(r["entries"] for r in dead_lettered) == VALID // INVALID_EVERY
    assert len(dead_lettered) < VALID // INVALID_EVERY


def test_logs_are_human_readable_on_a_terminal() -> None:
    program = (
        "import logging; from fraudd.runtime import logs; logs.setup('INFO', 'c-7'); "
        "logging.getLogger('fraudd.t').info('hello', extra={'event': 'greeted', 'entries': 3}); "
        "logging.getLogger('fraudd.t').debug('hidden')"
    )
    primary, secondary = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", program], stderr=secondary, check=True, timeout=30)
        os.close(secondary)
        output = os.read(primary, 4096).decode()
    finally:
        os.close(primary)
    assert re.search(r"INFO +c-7 fraudd\.t: hello entries=3", output), output
    assert "hidden" not in output and "{" not in output
