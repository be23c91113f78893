"""Each command takes the options its service reads and no other, refuses a bad value with one line
naming the option, and the package imports without a cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import click
import pytest
from click.testing import CliRunner

from fraudd import cli
from fraudd.alerts.settings import AlertSettings
from fraudd.ingest.settings import IngestSettings
from fraudd.learning.settings import LabelSettings
from fraudd.scoring.settings import ScoringSettings

from .conftest import Namespace

PACKAGE = Path(cli.__file__).resolve().parent
RULES_COMMANDS = cast(click.Group, cli.main.get_command(None, "rules")).commands

SERVICES = {"run": ScoringSettings, "ingest": IngestSettings, "alerts": AlertSettings, "labels": LabelSettings}
REQUIRED = {"alerts": ["--config", "alerts.toml"]}

# Flags only some commands may take, and which: what one service reads is no other's option.
SCORING = {"run"}
CONSUMERS = {"run", "alerts", "labels"}
RULES = {f"rules {name}" for name in RULES_COMMANDS}
OWNERS = {
    **dict.fromkeys(
        ("--model-path", "--rules-path", "--shadow-model", "--thresholds", "--review-threshold", "--decline-threshold"),
        SCORING,
    ),
    **dict.fromkeys(("--pipeline-depth", "--lease-ms"), SCORING),
    **dict.fromkeys(("--listen", "--api-keys-file", "--api-keys", "--max-batch", "--max-lag", "--tls-cert"), {"ingest"}),
    **dict.fromkeys(("--config", "--alerts-group", "--max-attempts", "--deliveries-retention-days"), {"alerts"}),
    **dict.fromkeys(("--consumer-id", "--batch-size", "--block-ms", "--claim-idle-ms", "--max-deliveries"), CONSUMERS),
    **dict.fromkeys(("--metrics-listen", "--metrics-port"), CONSUMERS),
    "--labels-stream": {"ingest", "labels"},
    "--workers": {"run", "ingest", "alerts", "labels"},
    "--shutdown-timeout-s": {"run", "ingest", "alerts", "labels"},
    "--dedup-window-s": {"run", "ingest", "status"},
    "--stream": {"run", "ingest", "labels", "status", "dlq list", "dlq replay", "dlq purge", *RULES},
    "--shards": {"run", "ingest", "labels", "status", "dlq list", "dlq replay", "dlq purge", *RULES},
    "--group": {"run", "ingest", "labels", "status"},
}


def commands() -> dict[str, click.Command]:
    """Every service and operations command by its name (``dlq list``: a subcommand)."""
    named = {name: cli.main.get_command(None, name) for name in (*SERVICES, "status", "migrate")}
    named.update({f"dlq {name}": command for name, command in cli.dlq.commands.items()})
    named.update({f"rules {name}": command for name, command in RULES_COMMANDS.items()})
    return named


def flags(command: click.Command) -> set[str]:
    return {flag for param in command.params if isinstance(param, click.Option) for flag in param.opts}


class Recording(dict):
    """A command's parameters that remember which ones were read."""

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.read: set[str] = set()

    def __getitem__(self, key: str):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("name", sorted(OWNERS["--workers"]))
def test_each_service_settings_read_every_option_the_command_takes(name: str) -> None:
    command = cli.main.get_command(None, name)
    params = Recording(command.make_context(name, REQUIRED.get(name, [])).params)
    SERVICES[name].from_params(params)
    assert set(params) - params.read == set(), f"fraudd {name} takes options its settings never read"


def test_no_command_takes_an_option_of_another_service() -> None:
    for name, command in commands().items():
        foreign = sorted(flag for flag in flags(command) if flag in OWNERS and name not in OWNERS[flag])
        assert foreign == [], f"fraudd {name} takes {foreign}"


def test_alerts_help_lists_no_scoring_option() -> None:
    result = CliRunner().invoke(cli.main, ["alerts", "--help"])
    assert result.exit_code == 0 and "--alerts-group" in result.output
    for flag in ("--model-path", "--shadow-model", "--rules-path", "--lease-ms", "--stream ", "--listen"):
        assert flag not in result.output


def test_every_option_of_a_service_keeps_its_environment_variable() -> None:
    # The services' settings; a one-shot command's own flags (status --lag-limit, dlq --reason) are no setting.
    for name in (*SERVICES, "migrate"):
        for param in cli.main.get_command(None, name).params:
            assert param.envvar, f"fraudd {name} {param.opts[0]} has no environment variable"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["run", "--batch-size", "0"], "--batch-size"),
        (["run", "--review-threshold", "1.5"], "--review-threshold"),
        (["run", "--thresholds", "t.json", "--review-threshold", "0.5"], "--thresholds"),
        (["run", "--redis-cluster"], "--redis-cluster"),
        (["ingest", "--listen", "nowhere"], "--listen"),
        (["ingest", "--tls-cert", __file__], "--tls-cert"),
        (["alerts", "--config", "a.toml", "--max-attempts", "0"], "--max-attempts"),
        (["alerts", "--config", "a.toml", "--metrics-listen", ":9464", "--metrics-port", "9465"], "--metrics-listen"),
        (["alerts", "--config", "a.toml", "--redis-url", "http://127.0.0.1:6379"], "--redis-url"),
        (["labels", "--postgres-url", "not a connection string"], "--postgres-url"),
        (["labels", "--workers", "0"], "--workers"),
        (["labels", "--metrics-listen", "9464"], "--metrics-listen"),
        (["status", "--shards", "0"], "--shards"),
        (["migrate", "--retention-days", "-1"], "--retention-days"),
    ],
)
def test_a_bad_value_stops_start_up_with_one_line_naming_the_option(args: list[str], option: str) -> None:
    result = CliRunner().invoke(cli.main, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(errors) == 1 and option in errors[0], result.output
    assert "Traceback" not in result.output


# What no operator's command imports unless it uses them: the models' runtime, and numpy.
HEAVY = {"numpy", "onnxruntime", "sklearn"}


def imported(stderr: str) -> set[str]:
    """The modules a process run with ``-X importtime`` imported, from its stderr."""
    return {line.rpartition("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "args", [["--help"], ["ingest", "--help"], ["console", "--help"], ["alerts", "--help"], ["status", "--help"]]
)
def test_the_command_line_starts_without_numpy_or_the_models_runtime(args: list[str]) -> None:
    """``fraudd`` starts for every operator's command and hundreds of times in these tests: numpy,
    onnxruntime and scikit-learn come with the commands that use them, never with the command line."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fraudd", *args], capture_output=True, text=True, timeout=60, check=True
    )
    modules = imported(result.stderr)
    assert "fraudd.cli" in modules
    assert modules.isdisjoint(HEAVY)
    # The commands of other packages come with their own invocation only.
    assert modules.isdisjoint(lazy.target.partition(":")[0] for lazy in cli.LAZY.values())


def test_status_looks_at_the_servers_without_numpy_or_the_metrics(ns: Namespace) -> None:
    """``fraudd status`` runs from monitoring scripts every few seconds: Redis's memory, PostgreSQL
    and the dedup markers' estimate need neither numpy nor the services' metrics (prometheus-client)."""
    result = ns.fraudd("status", PYTHONPROFILEIMPORTTIME="1")
    assert result.returncode == 0, result.stdout
    assert "dedup markers for the" in result.stdout and "postgres   up" in result.stdout
    modules = imported(result.stderr)
    assert "fraudd.scoring.dedup" in modules
    assert modules.isdisjoint(HEAVY | {"prometheus_client"})


# `fraudd --help` as a fresh process prints it, then with every lazily registered command imported first.
_HELP = (
    "import sys; from fraudd import cli; [cli.main.get_command(None, n) for n in sys.argv[1:]]; cli.main(['--help'], 'fraudd')"
)


@pytest.mark.parametrize("width", ["80", "200"])
def test_fraudd_help_lists_each_lazily_registered_command_with_its_own_short_help(width: str) -> None:
    """The listing shows a command not imported yet with the short help it is registered with: what
    the command itself says once imported, at any terminal width."""
    env = {**os.environ, "COLUMNS": width}

    def listing(*loaded: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", _HELP, *loaded], capture_output=True, text=True, timeout=60, check=True, env=env
        ).stdout

    lazily = listing()
    assert all(f"  {name} " in lazily for name in cli.LAZY)
    assert lazily == listing(*cli.LAZY)


def imports_of(path: Path, module: str) -> set[str]:
    """The fraudd modules ``module`` (at ``path``) imports, anywhere in it but under ``if TYPE_CHECKING``,
    with the packages each import runs on the way."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in found if name.startswith("fraudd")}


def test_no_import_cycle_among_fraudds_modules() -> None:
    modules = {
        ".".join(("fraudd", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph = {module: imports_of(path, module) & modules.keys() - {module} for module, path in modules.items()}
    # Python runs a module's parent packages before it, so a module importing its own parent is no cycle.
    graph = {module: {name for name in names if not module.startswith(name + ".")} for module, names in graph.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                cycles.append(" -> ".join([*trail[trail.index(name) :], name]))
            elif name not in state:
                visit(name, [*trail, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_readme_documents_every_option_of_every_service_with_its_environment_variable() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    for name in (*SERVICES, "migrate"):
        for param in cli.main.get_command(None, name).params:
            assert f"| `{param.opts[0]}` | `{param.envvar}` |" in readme, f"README lacks fraudd {name} {param.opts[0]}"


def test_the_readme_documents_every_setting_of_fraudd_rules_with_its_environment_variable() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    for name, command in RULES_COMMANDS.items():
        for param in command.params:
            if param.envvar:
                assert f"| `{param.opts[0]}` | `{param.envvar}` |" in readme, f"README lacks fraudd rules {name} {param.opts[0]}"


def test_fraudd_rules_takes_postgresql_redis_and_the_input_shards_only() -> None:
    for name, command in RULES_COMMANDS.items():
        settings = {flag for param in command.params if param.envvar for flag in param.opts}
        assert settings - {"--actor", "--minutes-per-case"} == {
            "--redis-url",
            "--redis-cluster",
            "--postgres-url",
            "--pg-schema",
            "--stream",
            "--shards",
        }, f"fraudd rules {name}"
