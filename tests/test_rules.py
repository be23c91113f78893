"""Rules: every default rule fires with its code, bad files are refused, blocklists are live."""

from __future__ import annotations

import uuid

import numpy as np
import orjson
import pytest
import redis

from fraudd.keys import Keys
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import BLOCKLIST_KINDS, FEATURE_NAMES, Features
from fraudd.scoring.rules import DECISIONS, Rule, RuleOutcome, Rules, RulesError, block, decide, model_decision
from fraudd.scoring.settings import DEFAULT_RULES

from .conftest import REDIS_URL
from .test_features import open_store

DEFAULT = Rules.load(DEFAULT_RULES)


def quiet_row() -> dict[str, float]:
    """An unremarkable transaction: fires no default rule."""
    row = dict.fromkeys(FEATURE_NAMES, 0.0)
    row.update(amount=25.0, amount_to_mean=1.0, count_1m=1.0, count_1h=1.0, count_24h=1.0)
    return row


def features_of(rows: list[dict[str, float]], blocked: dict[str, list[bool]] | None = None) -> Features:
    n = len(rows)
    matrix = np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=np.float32).reshape(n, -1)
    flags = {kind: np.array((blocked or {}).get(kind, [False] * n), dtype=bool) for kind in BLOCKLIST_KINDS}
    return Features(
        matrix=matrix,
        seen=np.zeros(n, bool),
        event_ms=np.zeros(n, np.int64),
        blocked=flags,
        amount=np.array([row["amount"] for row in rows]),
    )


def triggering(rule: Rule) -> tuple[dict[str, float], dict[str, list[bool]]]:
    row = quiet_row()
    nudge = {">": 1.0, ">=": 0.0, "<": -1.0, "<=": 0.0, "==": 0.0, "!=": 1.0}
    for condition in rule.conditions:
        row[condition.feature] = condition.value + nudge[condition.op]
    blocked = {rule.blocklist: [True]} if rule.blocklist else {}
    return row, blocked


def test_quiet_transaction_fires_nothing() -> None:
    outcome = DEFAULT.evaluate(features_of([quiet_row()]))
    assert outcome.action.tolist() == [0] and outcome.codes == [()]


@pytest.mark.parametrize("rule", DEFAULT.rules, ids=lambda rule: rule.code)
def test_each_default_rule_fires_with_its_code(rule: Rule) -> None:
    row, blocked = triggering(rule)
    outcome = DEFAULT.evaluate(features_of([quiet_row(), row], {k: [False, *v] for k, v in blocked.items()}))
    assert outcome.codes[0] == ()
    assert rule.code in outcome.codes[1]
    assert outcome.action[1] >= rule.action
    assert rule.reason


def test_shadow_rule_is_listed_but_never_decides() -> None:
    shadow = Rules.from_bytes(
        b'[[rule]]\ncode = "R_TRY"\nreason = "tried"\naction = "shadow"\nfeature = "amount"\nop = ">"\nvalue = 100\n'
    )
    row = quiet_row()
    row["amount"] = 500.0
    outcome = shadow.evaluate(features_of([quiet_row(), row]))
    assert outcome.action.tolist() == [0, 0] and outcome.codes == [(), ("R_TRY",)]
    assert decide(model_decision(np.array([0.0, 0.0]), 0.5, 0.9), outcome.action).tolist() == [0, 0]
    shadow.evaluate(features_of([row, row, quiet_row()]))
    assert [(rule.code, count) for rule, count in shadow.take_hits()] == [("R_TRY", 3)]  # counted for the metric
    assert shadow.take_hits() == []


def test_strongest_action_wins_and_all_codes_are_listed() -> None:
    row = quiet_row()
    row.update(count_1m=9.0)  # review
    outcome = DEFAULT.evaluate(features_of([row], {"merchant": [True]}))  # decline
    assert outcome.action.tolist() == [2]
    assert set(outcome.codes[0]) == {"R_VELOCITY_1M", "R_BLOCKED_MERCHANT"}


def test_conjunction_needs_every_condition() -> None:
    half = quiet_row()
    half.update(card_count_1h=12.0)  # card burst, but not small amounts
    full = dict(half, amount=1.0)
    outcome = DEFAULT.evaluate(features_of([half, full]))
    assert "R_CARD_TESTING" not in outcome.codes[0]
    assert "R_CARD_TESTING" in outcome.codes[1] and outcome.action[1] == 2


def test_decide_takes_the_max_of_model_and_rules() -> None:
    outcome = RuleOutcome(np.array([0, 0, 0, 1, 2, 1], dtype=np.int8), [()] * 6)
    scores = np.array([0.1, 0.6, 0.95, 0.1, 0.1, 0.95])
    decisions = decide(model_decision(scores, 0.5, 0.9), outcome.action)
    assert decisions.dtype == np.int8
    assert [DECISIONS[d] for d in decisions] == ["approve", "review", "decline", "review", "decline", "decline"]


def test_version_follows_the_content(tmp_path) -> None:
    text = DEFAULT_RULES.read_bytes()
    assert Rules.from_bytes(text).version == DEFAULT.version
    assert Rules.from_bytes(text + b"\n").version != DEFAULT.version
    assert len(DEFAULT.version) == 12


BAD_FILES = {
    "unknown feature": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nfeature = "nope"\nop = ">"\nvalue = 1\n',
        "R_X",
        "unknown feature 'nope'",
    ),
    "bad op": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nfeature = "count_1m"\nop = "=>"\nvalue = 1\n',
        "R_X",
        "bad op '=>'",
    ),
    "bad action": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "block"\nfeature = "count_1m"\nop = ">"\nvalue = 1\n',
        "R_X",
        "'action' must be one of",
    ),
    "bool value": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nfeature = "count_1m"\nop = ">"\nvalue = true\n',
        "R_X",
        "'value' must be a finite number",
    ),
    "bad blocklist": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "decline"\nblocklist = "email"\n',
        "R_X",
        "'blocklist' must be one of",
    ),
    "two conditions": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "decline"\nblocklist = "ip"\nfeature = "amount"\n',
        "R_X",
        "exactly one condition",
    ),
    "bad conjunct": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nall = [{feature = "amount", op = ">"}]\n',
        "R_X",
        "all[0]",
    ),
    "missing reason": ('[[rule]]\ncode = "R_X"\naction = "review"\nfeature = "amount"\nop = ">"\nvalue = 1\n', "R_X", "'reason'"),
    "typo key": (
        '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nfeature = "amount"\nop = ">"\nvalue = 1\nvalu = 2\n',
        "R_X",
        "unknown key(s) ['valu']",
    ),
    "bad code": (
        '[[rule]]\ncode = "velocity"\nreason = "r"\naction = "review"\nfeature = "amount"\nop = ">"\nvalue = 1\n',
        "rule #1",
        "UPPER_SNAKE_CASE",
    ),
    "not toml": ("[[rule]\ncode = ", "bad.toml", "not valid TOML"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_is_refused_with_a_clear_message(name: str, tmp_path) -> None:
    text, names, says = BAD_FILES[name]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as caught:
        Rules.load(path)
    assert names in str(caught.value) and says in str(caught.value)


def test_duplicate_codes_are_refused() -> None:
    rule = '[[rule]]\ncode = "R_X"\nreason = "r"\naction = "review"\nfeature = "amount"\nop = ">"\nvalue = 1\n'
    with pytest.raises(RulesError, match="R_X.*duplicate code"):
        Rules.from_bytes((rule + rule).encode())


# The value each blocklist is keyed by, in an otherwise unremarkable transaction.
BLOCKED_VALUES = {"ip": ("ip", "203.0.113.7"), "card": ("card_id", "card_4242")}


@pytest.mark.parametrize("owned", [False, True], ids=["shared", "owned"])
@pytest.mark.parametrize("kind", sorted(BLOCKED_VALUES))
def test_blocklist_rule_fires_after_a_live_block(kind: str, owned: bool) -> None:
    """``rules.block`` (what the console and `fraudd rules block` write) declines the next transaction
    with that value, whether the shard's state is shared or owned through a lease."""
    client = redis.Redis.from_url(REDIS_URL)
    name = f"test-rules-{uuid.uuid4().hex[:10]}"
    keys = Keys(stream=f"{name}:raw", fraud_stream=f"{name}:fraud", dlq_stream=f"{name}:dlq")
    store = open_store(client, keys, owned)
    field, value = BLOCKED_VALUES[kind]
    payload = {"user_id": "mallory", "amount": 30.0, "merchant": "Shady Goods", "timestamp": 1764385200, field: value}
    try:

        def score(txid: str) -> RuleOutcome:
            batch = decode_batch(["1-0"], [orjson.dumps(dict(payload, transaction_id=txid))])
            return DEFAULT.evaluate(store.compute(batch))

        assert score("t1").codes == [()]
        assert block(client, keys.stream, 1, kind, value)
        outcome = score("t2")
        assert outcome.codes == [(f"R_BLOCKED_{kind.upper()}",)] and outcome.action.tolist() == [2]
    finally:
        stale = list(client.scan_iter(match=keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*"))
        if stale:
            client.delete(*stale)
