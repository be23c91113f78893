"""fraudd as a new user installs it: a wheel built from the sources, in a fresh venv outside the checkout.

The wheel is built from a copy of the files git would clone (no stale ``build/`` folder can slip
files in), installed with the machine's own pip configuration into a venv without system site
packages, and that venv's ``fraudd`` migrates a fresh schema and scores generated traffic with the
defaults it ships: migrations, model, rules and Lua all come from inside the installed package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from pathlib import Path

import numpy as np
import orjson
import redis
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.model import FraudModel
from fraudd.scoring.settings import DEFAULT_MODEL

from .conftest import Namespace
from .services import drain
from .streams import publish

REPO = Path(__file__).resolve().parent.parent
TRANSACTIONS = 4000
# What the daemon reads at run time; a wheel without any of these cannot score.
RUNTIME_FILES = (
    "fraudd/migrations/001_transactions.sql",
    "fraudd/scoring/fraud.onnx",
    "fraudd/scoring/rules.toml",
    "fraudd/scoring/features.lua",
)


def _run(*command: str | Path, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _clone_sources(destination: Path) -> Path:
    """The checkout's files as a clone would have them, with uncommitted edits, without ignored ones."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a file deleted but not yet committed is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _installed_fraudd(tmp_path: Path) -> tuple[Path, Path]:
    """Build the wheel and install it into a fresh venv; returns (venv, wheel)."""
    sources = _clone_sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, sources, cwd=tmp_path)
    (wheel,) = wheels.glob("fraudd-*.whl")
    venv = tmp_path / "venv"
    # No pip of its own to bootstrap (seconds saved): this pip installs into it, with the same config.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    # Nor byte-compiling every module of 200 MB of dependencies (most of the install's time on a busy
    # box): Python compiles the few it imports when it imports them.
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile", wheel, cwd=tmp_path)
    return venv, wheel


def test_wheel_installed_elsewhere_migrates_and_scores(redis_client: redis.Redis, tmp_path: Path) -> None:
    started = time.monotonic()
    venv, wheel = _installed_fraudd(tmp_path)
    installed = time.monotonic() - started
    assert set(RUNTIME_FILES) <= set(zipfile.ZipFile(wheel).namelist())

    ns = Namespace(f"t{uuid.uuid4().hex[:10]}", executable=str(venv / "bin" / "fraudd"))
    try:
        # The same environment the daemon gets resolves fraudd, and its default model, to the venv.
        where = subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import fraudd, fraudd.scoring.settings; print(fraudd.__file__); print(fraudd.scoring.settings.DEFAULT_MODEL)",
            ],
            env=ns.env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        site_packages = venv.resolve() / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        assert [Path(p).resolve() for p in where] == [
            site_packages / "fraudd" / "__init__.py",
            site_packages / "fraudd" / "scoring" / "fraud.onnx",
        ], where
        assert not Path(where[0]).resolve().is_relative_to(REPO)

        migrated = ns.fraudd("migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "applied 001_transactions" in migrated.stdout

        generated = TransactionGenerator(
            GeneratorConfig(seed=5, start_ts=time.time() - TRANSACTIONS - 60, tx_per_second=1.0, fraud_rate=0.05)
        ).generate(TRANSACTIONS)
        publish(redis_client, ns.stream, generated.payloads())
        drain(redis_client, ns, tmp_path, "--workers", "2", "--batch-size", "500")

        rows = ns.sql("SELECT transaction_id, user_id, amount, decision, model_version FROM transactions")
        assert len(rows) == TRANSACTIONS
        by_id = {txid: (user, amount, decision, version) for txid, user, amount, decision, version in rows}
        assert by_id.keys() == set(generated.transaction_ids)
        expected_users = dict(zip(generated.transaction_ids, generated.user_id.tolist()))
        assert all(expected_users[txid] == user for txid, (user, *_rest) in by_id.items())
        assert {version for *_rest, version in by_id.values()} == {FraudModel.load(DEFAULT_MODEL, FEATURE_NAMES).version}
        flagged = {txid: decision for txid, (_u, _a, decision, _v) in by_id.items() if decision != "approve"}
        alerts = [orjson.loads(fields[b"data"]) for _id, fields in redis_client.xrange(ns.fraud_stream)]
        assert {a["transaction_id"]: a["decision"] for a in alerts} == flagged and len(alerts) == len(flagged)
        caught = int(np.isin(np.array(list(flagged), dtype=object), generated.transaction_id[generated.is_fraud]).sum())
        assert caught > 0, "the shipped model flagged none of the injected fraud"
        print(
            f"\nwheel {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) built and installed in {installed:.1f}s; "
            f"{len(rows)} rows, {len(flagged)} flagged ({caught} of {int(generated.is_fraud.sum())} injected fraud)"
        )

        # An installation that lost its migrations says so in one line, for migrate and for run.
        for sql in (site_packages / "fraudd" / "migrations").glob("*.sql"):
            sql.unlink()
        for command in ("migrate", "run"):
            result = ns.fraudd(command, FRAUDD_PG_SCHEMA=f"{ns.schema}_fresh")
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and lines[0].startswith("Error: ") and "no migrations found" in lines[0], result.stderr
    finally:
        ns.drop(redis_client)


ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.MULTILINE)


def _pins(lock: Path) -> dict[str, str]:
    """name -> version of every requirement in a pip-compile lock; each must carry its hashes."""
    text = lock.read_text()
    pins = {canonicalize_name(name): version for name, version, _hashes in _PIN.findall(text)}
    listed = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(listed) == len(pins), f"{lock.name}: a requirement without hashes"
    return pins


def test_the_lock_files_pin_every_dependency_with_hashes() -> None:
    """What a deployment (requirements.lock) and the set-up (requirements-dev.lock) install is the
    whole tree pyproject.toml asks for, each at one version with its hashes; a dependency added to
    pyproject.toml without locking it again fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    wanted = {"requirements.lock": (runtime, project["dependencies"])}
    wanted["requirements-dev.lock"] = (
        dev,
        project["dependencies"] + [r for e in ("dev", "train") for r in project["optional-dependencies"][e]],
    )
    for lock, (pins, requirements) in wanted.items():
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock} lacks {name}: lock again (README: Deploying)"
            assert requirement.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} is not {text}"
    assert {name: dev.get(name) for name in runtime} == runtime, "the set-up must test the versions a deployment installs"
