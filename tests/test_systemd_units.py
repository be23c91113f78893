"""The systemd units and the example environment file, checked with systemd's own tools.

The units are rendered with this checkout's ``fraudd`` in place of ``/opt/fraudd/bin/fraudd``:
``systemd-analyze verify`` wants every ExecStart binary to exist.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fraudd import cli, config
from fraudd.runtime.supervisor import STOP_MARGIN_S

from .conftest import FRAUDD

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
INSTALLED_FRAUDD = "/opt/fraudd/bin/fraudd"
# Everything but what a unit says about its own service: identical in every unit, so that
# hardening one hardens all.
OWN_SETTINGS = {"ExecStart", "ExecReload", "EnvironmentFile", "Environment", "RuntimeDirectory", "ReadOnlyPaths"}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (.ci/setup installs it)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("units")
    for unit in [*SERVICES, *UNITS.glob("*.target")]:
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
    assert {Path(u).name for u in units} >= {"fraudd.service", "fraudd-ingest.service", "fraudd.target"}


def test_exposure_is_ok_and_the_readme_says_what_it_is(rendered: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    for unit in SERVICES:
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(rendered / unit.name)],
                                capture_output=True, text=True, timeout=60)
        score, level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout).groups()
        assert level in ("PERFECT", "SAFE", "OK"), result.stdout[-3000:]
        assert f"`{unit.name}`: {score} {level}" in readme, f"README should say `{unit.name}`: {score} {level}"


def test_units_run_as_notify_services_with_the_drain_timeout_and_the_same_hardening() -> None:
    drain_s = next(kwargs["default"] for flag, _env, kwargs, _help in config.OPTIONS if flag == "shutdown-timeout-s")
    reference = None
    for unit in SERVICES:
        settings = dict(service_section(unit))
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


def test_the_environment_file_documents_every_option_and_its_values_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (UNITS / "fraudd.env").read_text().splitlines()
    assignments = [re.match(r"#?([A-Z][A-Z0-9_]*)=(.*)", line) for line in lines]
    documented = [m.group(1) for m in assignments if m]
    options = {name: value for name, value in vars(config).items() if name.endswith("OPTIONS")}
    known = {envvar for option_list in options.values() for _flag, envvar, _kwargs, _help in option_list}
    missing, unknown = sorted(known - set(documented)), sorted(set(documented) - known)
    assert missing == [], f"systemd/fraudd.env lacks {missing}: document each new option there"
    assert unknown == [], f"systemd/fraudd.env names options that do not exist: {unknown}"
    assert len(documented) == len(set(documented)), "a variable appears twice"

    for name in known:
        monkeypatch.delenv(name, raising=False)
    for match, line in zip(assignments, lines):
        if match and not line.startswith("#"):
            monkeypatch.setenv(match.group(1), match.group(2))
    for name in ("run", "ingest"):
        command = cli.main.get_command(None, name)
        command.make_context(name, [])  # parses and checks every option, from the environment
