"""What changed from one rule set to another: the rules added, removed and changed (by code), then
the text's unified diff. ``fraudd rules diff`` prints it, the console's rules page shows it."""

from __future__ import annotations

import difflib

from .store import RuleSet


def rule_changes(left: RuleSet, right: RuleSet) -> list[str]:
    """``+ CODE`` for each rule added, ``- CODE`` removed, ``~ CODE`` changed, each group by code."""
    old, new = {r.code: r for r in left.rules().rules}, {r.code: r for r in right.rules().rules}
    return (
        [f"+ {code}" for code in sorted(new.keys() - old.keys())]
        + [f"- {code}" for code in sorted(old.keys() - new.keys())]
        + [f"~ {code}" for code in sorted(c for c in old.keys() & new.keys() if old[c] != new[c])]
    )


def text_diff(left: RuleSet, right: RuleSet) -> list[str]:
    """The unified diff of the two sources, line by line (each line keeps its end of line)."""
    return list(
        difflib.unified_diff(
            left.source.splitlines(True), right.source.splitlines(True), f"version {left.version}", f"version {right.version}"
        )
    )
