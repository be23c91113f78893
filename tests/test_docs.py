"""The docs against the tree: README.md's module table and the names DESIGN.md cites.

A module added without a row, a row naming a file that moved, or a design naming a function that
no longer exists fails here instead of misleading the next reader.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from fraudd.scoring import model

ROOT = Path(__file__).resolve().parent.parent
_BACKTICKED = re.compile(r"`([^`\n]+)`")
_FENCED = re.compile(r"^```.*?^```", re.S | re.M)
# What DESIGN.md cites as the enforcing code: a dotted name under fraudd (module, then attributes).
_DOTTED = re.compile(r"fraudd(\.[A-Za-z_]\w*)+")
_PATH = re.compile(r"fraudd/[\w./-]*")


def module_table_paths() -> list[Path]:
    """The paths the first column of README.md's module table names. A bare file name is in the
    directory of the path before it in the same cell (`fraudd/runtime/health.py`, `metrics.py`)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| module | concern |") + 2  # past the header and its rule
    paths: list[Path] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        directory = ROOT
        for name in _BACKTICKED.findall(line.split("|")[1]):
            path = ROOT / name if "/" in name else directory / name
            directory = path if name.endswith("/") else path.parent
            paths.append(path)
    return paths


def fraudd_modules() -> set[Path]:
    return {path for path in (ROOT / "fraudd").rglob("*.py") if path.name not in ("__init__.py", "__main__.py")}


def test_every_path_in_the_module_table_exists() -> None:
    paths = module_table_paths()
    assert len(paths) > 20  # the table was found
    missing = [str(path.relative_to(ROOT)) for path in paths if not path.exists()]
    assert not missing, f"README.md's module table names what is not in the tree: {missing}"


def test_every_fraudd_module_is_in_the_module_table() -> None:
    listed = set(module_table_paths())
    absent = sorted(str(path.relative_to(ROOT)) for path in fraudd_modules() - listed)
    assert not absent, f"modules missing from README.md's module table: {absent}"


def resolve(dotted: str) -> object:
    """The object a dotted name stands for: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for length in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:length]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[length:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def design_quotes() -> list[str]:
    """What DESIGN.md's prose quotes (code blocks left out)."""
    return _BACKTICKED.findall(_FENCED.sub("", (ROOT / "DESIGN.md").read_text()))


def design_names() -> list[str]:
    return [name for quoted in design_quotes() for name in [quoted.split("(")[0]] if _DOTTED.fullmatch(name)]


def test_every_name_design_cites_exists() -> None:
    names = design_names()
    assert len(names) > 20
    # The model's metadata keys are dotted too (``fraudd.feature_bins``): those must be real keys.
    metadata_keys = {value for name, value in vars(model).items() if name.startswith("META_")}
    unknown = []
    for name in names:
        if name in metadata_keys:
            continue
        try:
            resolve(name)
        except (ImportError, AttributeError):
            unknown.append(name)
    assert not unknown, f"DESIGN.md cites names that do not exist: {unknown}"


def test_every_path_design_cites_exists() -> None:
    paths = {match for quoted in design_quotes() for match in _PATH.findall(quoted)}
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"DESIGN.md cites paths that do not exist: {missing}"
