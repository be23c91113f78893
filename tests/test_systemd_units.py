"""The systemd units and the example environment file, checked with systemd's own tools.

The units are rendered with this checkout's ``fraudd`` in place of ``/opt/fraudd/bin/fraudd``:
``systemd-analyze verify`` wants every ExecStart binary to exist. The sandbox itself needs a
running systemd, which CI has not; instead strace shows that the services make no system call the
units' ``SystemCallFilter=`` refuses and map no memory ``MemoryDenyWriteExecute=`` refuses.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from fraudd import cli
from fraudd.ingest import settings as ingest_settings
from fraudd.runtime.supervisor import STOP_MARGIN_S
from fraudd.settings import SHUTDOWN_TIMEOUT_S

from .alerting import SECRET, HttpReceiver
from .conftest import FRAUDD, Namespace, wait_for, worker_pids
from .ingest_server import tx
from .services import free_port
from .streams import fully_drained, publish, valid_payloads
from .test_alerts import alert, write_config

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
# Run by a timer to completion, not supervised: its lifecycle settings are its own.
JOBS = [UNITS / "fraudd-retrain.service"]
DAEMONS = [unit for unit in SERVICES if unit not in JOBS]
INSTALLED_FRAUDD = "/opt/fraudd/bin/fraudd"
# Everything but what a unit says about its own service: identical in every unit, so that
# hardening one hardens all.
OWN_SETTINGS = {
    "ExecStart",
    "ExecReload",
    "EnvironmentFile",
    "Environment",
    "RuntimeDirectory",
    "ReadOnlyPaths",
    "ReadWritePaths",
}
# What a job may set otherwise, each with the reason in its unit.
JOB_OWN_SETTINGS = {"MemoryDenyWriteExecute"}
# How a long-running service starts, stops, restarts and what memory it gets: a job's differ.
LIFECYCLE = {
    "Type",
    "ExecReload",
    "KillMode",
    "KillSignal",
    "TimeoutStopSec",
    "TimeoutStartSec",
    "WatchdogSec",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "RuntimeDirectoryMode",
    "MemoryHigh",
    "MemoryMax",
    "Nice",
    "CPUWeight",
}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (.ci/setup installs it)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("units")
    for unit in [*SERVICES, *UNITS.glob("*.target"), *UNITS.glob("*.timer")]:
        (directory / unit.name).write_text(unit.read_text().replace(INSTALLED_FRAUDD, FRAUDD))
    return directory


def service_section(unit: Path) -> list[tuple[str, str]]:
    """The [Service] section's (key, value) lines, repeated keys included, in order."""
    section, lines = None, []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, value = line.split("=", 1)
            lines.append((key, value))
    return lines


def test_every_unit_verifies(rendered: Path) -> None:
    units = sorted(str(path) for path in rendered.iterdir())
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown or misspelt setting and only warns: the warning is the failure.
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert {Path(u).name for u in units} >= {"fraudd.service", "fraudd-ingest.service", "fraudd.target", "fraudd-retrain.timer"}


def test_exposure_is_ok_and_the_readme_says_what_it_is(rendered: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    for unit in SERVICES:
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", str(rendered / unit.name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        score, level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout).groups()
        assert level in ("PERFECT", "SAFE", "OK"), result.stdout[-3000:]
        assert f"`{unit.name}`: {score} {level}" in readme, f"README should say `{unit.name}`: {score} {level}"


def test_units_run_as_notify_services_with_the_drain_timeout_and_the_same_hardening() -> None:
    drain_s = SHUTDOWN_TIMEOUT_S.default
    connections = next(option.default for option in ingest_settings.OPTIONS if option.flag == "max-connections")
    reference = None
    for unit in DAEMONS:
        settings = dict(service_section(unit))
        # Files per process: the ingest's connections, and room for much more than its default cap.
        assert int(settings["LimitNOFILE"]) >= 16 * connections, unit.name
        assert settings["Type"] == "notify" and settings["ExecReload"] == "/bin/kill -HUP $MAINPID", unit.name
        assert float(settings["TimeoutStopSec"]) == drain_s + STOP_MARGIN_S, unit.name
        assert settings["User"] == "fraudd" and settings["CapabilityBoundingSet"] == "", unit.name
        assert settings["Environment"].startswith(f"PROMETHEUS_MULTIPROC_DIR=/run/{settings['RuntimeDirectory']}/")
        shared = [(key, value) for key, value in service_section(unit) if key not in OWN_SETTINGS]
        assert reference is None or shared == reference, f"{unit.name} differs from {SERVICES[0].name}"
        reference = shared
        units = configparser.ConfigParser(strict=False, interpolation=None)
        units.read_string(unit.read_text())
        assert units["Unit"]["PartOf"] == "fraudd.target" and units["Install"]["WantedBy"] == "fraudd.target"
    assert reference is not None
    for job in JOBS:
        settings = dict(service_section(job))
        assert settings["Type"] == "oneshot" and settings["User"] == "fraudd", job.name
        hardening = [(key, value) for key, value in reference if key not in LIFECYCLE | JOB_OWN_SETTINGS]
        own = OWN_SETTINGS | LIFECYCLE | JOB_OWN_SETTINGS
        assert [(k, v) for k, v in service_section(job) if k not in own] == hardening, job.name
        timer = configparser.ConfigParser(strict=False, interpolation=None)
        timer.read_string(job.with_suffix(".timer").read_text())
        assert timer["Unit"]["PartOf"] == "fraudd.target" and timer["Install"]["WantedBy"] == "fraudd.target"


# The commands the units run: the environment file holds their settings.
SERVICES_COMMANDS = ("run", "ingest", "alerts", "console")


def envvars(name: str) -> set[str]:
    """The environment variables command ``fraudd <name>`` reads its options from."""
    return {param.envvar for param in cli.main.get_command(None, name).params if getattr(param, "envvar", None)}


def test_the_environment_file_documents_every_option_and_its_values_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (UNITS / "fraudd.env").read_text().splitlines()
    assignments = [re.match(r"#?([A-Z][A-Z0-9_]*)=(.*)", line) for line in lines]
    documented = [m.group(1) for m in assignments if m]
    known = {envvar for command in SERVICES_COMMANDS for envvar in envvars(command)}
    missing, unknown = sorted(known - set(documented)), sorted(set(documented) - known)
    assert missing == [], f"systemd/fraudd.env lacks {missing}: document each new option there"
    assert unknown == [], f"systemd/fraudd.env names options that do not exist: {unknown}"
    assert len(documented) == len(set(documented)), "a variable appears twice"

    for name in known:
        monkeypatch.delenv(name, raising=False)
    for match, line in zip(assignments, lines):
        if match and not line.startswith("#"):
            monkeypatch.setenv(match.group(1), match.group(2))
    for name in SERVICES_COMMANDS:
        command = cli.main.get_command(None, name)
        command.make_context(name, [])  # parses and checks every option, from the environment


# -- what the sandbox refuses, against what the services do ---------------------------------------

# Refused with EPERM (SystemCallErrorNumber=) and harmless: OpenBLAS (numpy) asks for a NUMA
# preference on its buffers and ignores the answer.
TOLERATED_SYSCALLS = {"mbind"}
_SYSCALL = re.compile(r"^\d+\s+(\w+)\(")


def allowed_syscalls(unit: Path) -> set[str]:
    """The system calls the unit's ``SystemCallFilter=`` lines leave, expanded by systemd-analyze."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    # A set's name on a line of its own, then its members indented under it.
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in listing.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            if line.startswith(" "):
                members.append(line.strip())
            else:
                members = groups[line.strip()] = []

    def expand(name: str) -> set[str]:
        return set().union(*(expand(item) for item in groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set()
    denied: set[str] = set()
    for key, value in service_section(unit):
        if key == "SystemCallFilter":
            target, names = (denied, value[1:]) if value.startswith("~") else (allowed, value)
            target.update(*(expand(name) for name in names.split()))
    return allowed - denied


def traced(ns: Namespace, tmp_path: Path, unit: str, command: list[str], work_done: Callable[[], bool], **env: str) -> None:
    """Run ``fraudd *command`` under strace (every process, every call) until ``work_done``, reload it,
    stop it, and check the trace against ``unit``. Its home is unwritable, as the unit's is."""
    trace = tmp_path / f"{unit}.trace"
    with open(tmp_path / f"{unit}.log", "wb") as log:
        process = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), FRAUDD, *command],
            env=ns.env(HOME="/proc/nonexistent", **env),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_for(work_done, 60, message=f"{command[0]} to work under strace")
        supervisor = worker_pids(process.pid)[0]  # strace's child
        os.kill(supervisor, signal.SIGHUP)
        time.sleep(1)
        os.kill(supervisor, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / f"{unit}.log").read_text()[-2000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    check_trace(trace, UNITS / unit)


def check_trace(trace: Path, unit: Path) -> None:
    lines = trace.read_text(errors="replace").splitlines()
    used = {m.group(1) for m in map(_SYSCALL.match, lines) if m}
    refused = sorted(used - allowed_syscalls(unit) - TOLERATED_SYSCALLS)
    assert len(used) > 40 and refused == [], f"{unit.name}'s SystemCallFilter refuses {refused}"
    if dict(service_section(unit)).get("MemoryDenyWriteExecute") != "yes":
        return
    # MemoryDenyWriteExecute refuses memory both writable and executable, and making memory executable later.
    wx = [
        line
        for line in lines
        if re.search(r"\b(mmap|mprotect|pkey_mprotect)\(.*PROT_EXEC", line) and ("PROT_WRITE" in line or "mprotect(" in line)
    ]
    assert wx == [], f"{unit.name}'s MemoryDenyWriteExecute refuses {wx[:3]}"


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace missing (.ci/setup installs it)")


@needs_strace
def test_scoring_uses_only_what_its_sandbox_allows(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    publish(redis_client, ns.stream, valid_payloads(2000, "sandbox"))
    traced(
        ns,
        tmp_path,
        "fraudd.service",
        ["run", "--workers", "2", "--metrics-port", str(free_port())],
        lambda: fully_drained(redis_client, ns),
    )


@needs_strace
def test_ingest_uses_only_what_its_sandbox_allows(ns: Namespace, tmp_path: Path) -> None:
    port = free_port()

    def answers() -> bool:
        try:
            return (
                httpx.post(
                    f"http://127.0.0.1:{port}/v1/transactions/batch", timeout=2, json=[tx(f"sandbox-http-{i}") for i in range(50)]
                ).status_code
                == 200
            )
        except httpx.TransportError:
            return False

    traced(ns, tmp_path, "fraudd-ingest.service", ["ingest", "--workers", "2", "--listen", f"127.0.0.1:{port}"], answers)


@needs_strace
def test_alerts_use_only_what_their_sandbox_allows(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    with HttpReceiver() as receiver:
        config = write_config(
            tmp_path,
            f"""
[[channels]]
name = "sandbox-webhook"
kind = "webhook"
url = "{receiver.url("/hook")}"
allow_insecure = true
secret_env = "FRAUDD_WEBHOOK_SECRET"
""",
        )
        for i in range(100):
            redis_client.xadd(ns.fraud_stream, {"data": orjson.dumps(alert(f"sandbox_{i}"))})
        traced(
            ns,
            tmp_path,
            "fraudd-alerts.service",
            ["alerts", "--config", str(config), "--workers", "2", "--from-beginning"],
            lambda: len(receiver.accepted) == 100,
            FRAUDD_WEBHOOK_SECRET=SECRET,
        )


@needs_strace
def test_console_uses_only_what_its_sandbox_allows(ns: Namespace, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("sandbox-password\n")
    assert ns.fraudd("users", "add", "sandbox", "--role", "analyst", "--password-file", str(password)).returncode == 0
    port = free_port()

    def signs_in() -> bool:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Accept": "text/html"}, timeout=5) as client:
                token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
                client.post("/login", data={"username": "sandbox", "password": "sandbox-password", "csrf": token})
                return "Claim next" in client.get("/").text
        except httpx.TransportError:
            return False

    traced(ns, tmp_path, "fraudd-console.service", ["console", "--workers", "2", "--listen", f"127.0.0.1:{port}"], signs_in)


@needs_strace
def test_retrain_uses_only_what_its_sandbox_allows(ns: Namespace, redis_client: redis.Redis, tmp_path: Path) -> None:
    from fraudd.ingest import Publisher
    from fraudd.learning.simulator import Simulator, SimulatorConfig

    from .services import drain

    traffic = Simulator(
        SimulatorConfig(
            seed=10, n_customers=300, n_terminals=600, days=20, card_thefts_per_day=4e-3, customer_compromises_per_day=4e-3
        )
    ).history()
    Publisher(redis_client, ns.stream).publish(traffic.payloads())
    drain(redis_client, ns, tmp_path, "--workers", "1", timeout=300)
    labels = tmp_path / "chargebacks.jsonl"
    labels.write_bytes(
        b"\n".join(orjson.dumps({"transaction_id": t, "label": "fraud"}) for t in traffic.transaction_id[traffic.is_fraud])
    )
    assert ns.fraudd("label", "--file", str(labels)).returncode == 0
    trace = tmp_path / "retrain.trace"
    result = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(trace),
            FRAUDD,
            "retrain",
            "--since",
            "30d",
            "--window",
            "4d",
            "--models-dir",
            str(tmp_path),
        ],
        env=ns.env(HOME="/proc/nonexistent"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    check_trace(trace, UNITS / "fraudd-retrain.service")
