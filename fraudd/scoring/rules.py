"""Operator rules over feature columns, evaluated for a whole batch with numpy.

Rules come from a TOML file that operators edit while the daemon runs, so loading validates
everything up front and raises ``RulesError`` naming the offending rule: the caller keeps the
rules it already has rather than scoring with a half-understood file.
"""

from __future__ import annotations

import hashlib
import operator
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from redis.cluster import RedisCluster

from fraudd.keys import Keys, shard_streams
from fraudd.scoring.features import (
    BLOCKLIST_KINDS,
    EXTRA_COLUMNS,
    FEATURE_NAMES,
    Features,
)

DECISIONS: tuple[str, ...] = ("approve", "review", "decline")
APPROVE, REVIEW, DECLINE = 0, 1, 2
# A shadow rule fires and is stored in the reasons, but never decides: how a new or noisy rule
# is tried on live traffic before it is trusted.
SHADOW = -1

_ACTIONS = {"review": REVIEW, "decline": DECLINE, "shadow": SHADOW}
ACTION_NAMES = {code: name for name, code in _ACTIONS.items()}
_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_COLUMNS = frozenset(FEATURE_NAMES) | frozenset(EXTRA_COLUMNS)
CODE_PATTERN = r"^[A-Z][A-Z0-9_]{0,63}$"  # a rule's code; PostgreSQL's regular expressions read it alike
_CODE = re.compile(CODE_PATTERN)
_RULE_KEYS = frozenset(("code", "reason", "action", "feature", "op", "value", "all", "blocklist"))
_CONDITION_KEYS = frozenset(("feature", "op", "value"))


class RulesError(ValueError):
    """The rules file is unusable; the message names the rule and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Condition:
    feature: str
    op: str
    value: float

    def holds(self, features: Features) -> np.ndarray:
        return _OPS[self.op](features.column(self.feature), self.value)


@dataclass(frozen=True, slots=True)
class Rule:
    code: str
    reason: str
    action: int  # REVIEW, DECLINE or SHADOW
    conditions: tuple[Condition, ...]  # all must hold; empty for a blocklist rule
    blocklist: str | None

    def matches(self, features: Features) -> np.ndarray:
        if self.blocklist is not None:
            return features.blocked[self.blocklist]
        mask = self.conditions[0].holds(features)
        for condition in self.conditions[1:]:
            mask = mask & condition.holds(features)
        return mask


@dataclass(slots=True)
class RuleOutcome:
    """Per row: the strongest action the rules force (0 none, 1 review, 2 decline) and which fired
    (shadow rules included)."""

    action: np.ndarray  # int8 (n,)
    codes: list[tuple[str, ...]]  # () where nothing fired


class Rules:
    """A validated rule set; ``version`` (sha256 prefix of the file) labels metrics and rows."""

    def __init__(self, rules: tuple[Rule, ...], version: str) -> None:
        self.rules = rules
        self.version = version
        self._codes = np.array([rule.code for rule in rules], dtype=object)
        self._actions = np.array([rule.action for rule in rules], dtype=np.int8)
        # Rows each rule fired on since the last take_hits(): shadow rules decide nothing, so this
        # count (a metric) and the reasons they leave in the rows are all they produce.
        self._hits = np.zeros(len(rules), dtype=np.int64)

    @classmethod
    def load(cls, path: str | Path) -> Rules:
        """Read and validate a rules file; raises RulesError (naming the file) if it is unusable."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RulesError(f"{path}: cannot read rules file: {exc}") from exc
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<rules>", version: str | None = None) -> Rules:
        """Parse and validate rules text; ``version`` names a stored rule set (default: the text's sha256 prefix)."""
        try:
            document = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RulesError(f"{source}: not valid TOML: {exc}") from exc
        unknown = set(document) - {"rule"}
        if unknown:
            raise RulesError(f"{source}: unknown top-level key(s) {sorted(unknown)}; rules go in [[rule]] tables")
        entries = document.get("rule", [])
        if not isinstance(entries, list):
            raise RulesError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        rules: list[Rule] = []
        for index, entry in enumerate(entries, start=1):
            rule = _parse_rule(entry, f"{source}: rule #{index}")
            if any(existing.code == rule.code for existing in rules):
                raise RulesError(f"{source}: rule #{index} ({rule.code}): duplicate code")
            rules.append(rule)
        return cls(tuple(rules), version or hashlib.sha256(data).hexdigest()[:12])

    def evaluate(self, features: Features) -> RuleOutcome:
        """Every rule over the whole batch at once; reason lists only for rows where one fired."""
        n = len(features)
        if not self.rules or n == 0:
            return RuleOutcome(np.zeros(n, dtype=np.int8), [()] * n)
        fired = self.fired(features)
        self._hits += fired.sum(axis=0)
        action = self.actions(fired)
        codes: list[tuple[str, ...]] = [()] * n
        for row in np.flatnonzero(fired.any(axis=1)):
            codes[row] = tuple(self._codes[fired[row]])
        return RuleOutcome(action, codes)

    def fired(self, features: Features) -> np.ndarray:
        """bool (n, rules): which rule fired on which row."""
        if not self.rules:
            return np.zeros((len(features), 0), dtype=bool)
        return np.column_stack([rule.matches(features) for rule in self.rules])

    def actions(self, fired: np.ndarray) -> np.ndarray:
        """int8 (n,): the strongest action forced on each row by the rules that ``fired``."""
        strongest: np.ndarray = np.where(fired, self._actions, 0).max(axis=1, initial=0).astype(np.int8)
        return strongest

    def take_hits(self) -> list[tuple[Rule, int]]:
        """(rule, rows it fired on) since the last call, for the rules that fired; resets the counts."""
        hits, self._hits = self._hits, np.zeros(len(self.rules), dtype=np.int64)
        return [(rule, int(count)) for rule, count in zip(self.rules, hits.tolist()) if count]


def block(client: redis.Redis | RedisCluster, stream: str, shards: int, kind: str, value: str, remove: bool = False) -> bool:
    """Put ``value`` on (or, with ``remove``, take it off) the live blocklist of ``kind`` (one of
    BLOCKLIST_KINDS) of every input shard of ``stream``: each shard's workers look up their own, and
    the next batch of each sees it. True when this changed the list (of any shard)."""
    if kind not in BLOCKLIST_KINDS:
        raise ValueError(f"no blocklist of kind {kind!r}; known: {list(BLOCKLIST_KINDS)}")
    pipe = client.pipeline(transaction=False)
    for shard in shard_streams(stream, shards):
        key = Keys(shard, "", "").blocklist(kind)
        pipe.srem(key, value) if remove else pipe.sadd(key, value)
    return any(pipe.execute())


def model_decision(scores: np.ndarray, review_threshold: float, decline_threshold: float) -> np.ndarray:
    """The model's own decision codes (int8 index into DECISIONS): its thresholds, before any rule."""
    by_model: np.ndarray = np.where(
        scores >= decline_threshold, DECLINE, np.where(scores >= review_threshold, REVIEW, APPROVE)
    ).astype(np.int8)
    return by_model


def decide(model: np.ndarray, rules_action: np.ndarray) -> np.ndarray:
    """Decision codes (index into DECISIONS): the stronger of the model's decision and the rules' action."""
    stronger: np.ndarray = np.maximum(model, rules_action)
    return stronger


def _parse_rule(entry: object, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise RulesError(f"{where}: must be a table")
    code = entry.get("code")
    if not isinstance(code, str) or not _CODE.match(code):
        raise RulesError(f"{where}: 'code' must be UPPER_SNAKE_CASE (letters, digits, _), got {code!r}")
    where = f"{where} ({code})"
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {sorted(unknown)}")
    reason = entry.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise RulesError(f"{where}: 'reason' must be a non-empty string")
    action = entry.get("action")
    if action not in _ACTIONS:
        raise RulesError(f"{where}: 'action' must be one of {sorted(_ACTIONS)}, got {action!r}")

    forms = [name for name in ("feature", "all", "blocklist") if name in entry]
    if len(forms) != 1:
        raise RulesError(f"{where}: needs exactly one condition: 'feature'/'op'/'value', 'all' or 'blocklist'")
    blocklist = None
    conditions: tuple[Condition, ...] = ()
    if forms[0] == "blocklist":
        blocklist = entry["blocklist"]
        if blocklist not in BLOCKLIST_KINDS or "op" in entry or "value" in entry:
            raise RulesError(f"{where}: 'blocklist' must be one of {list(BLOCKLIST_KINDS)} and stand alone")
    elif forms[0] == "all":
        parts = entry["all"]
        if not isinstance(parts, list) or not parts or "op" in entry or "value" in entry:
            raise RulesError(f"{where}: 'all' must be a non-empty array of {{feature, op, value}} tables")
        conditions = tuple(_parse_condition(part, f"{where}: all[{i}]") for i, part in enumerate(parts))
    else:
        conditions = (_parse_condition({k: entry.get(k) for k in _CONDITION_KEYS}, where),)
    return Rule(code, reason.strip(), _ACTIONS[action], conditions, blocklist)


def _parse_condition(part: object, where: str) -> Condition:
    if not isinstance(part, dict):
        raise RulesError(f"{where}: a condition must be a table with feature, op and value")
    unknown = set(part) - _CONDITION_KEYS
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {sorted(unknown)}")
    feature, op, value = part.get("feature"), part.get("op"), part.get("value")
    if feature not in _COLUMNS:
        raise RulesError(f"{where}: unknown feature {feature!r}; known: {sorted(_COLUMNS)}")
    if op not in _OPS:
        raise RulesError(f"{where}: bad op {op!r}; use one of {list(_OPS)}")
    # bool is an int subclass, and `value = true` is a typo, not a threshold.
    if value.__class__ not in (int, float) or not np.isfinite(value):
        raise RulesError(f"{where}: 'value' must be a finite number, got {value!r}")
    return Condition(feature, op, float(value))
