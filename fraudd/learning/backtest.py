"""Replaying stored transactions through a candidate model and rules (``fraudd backtest``).

The stored rows of a period are rebuilt as input messages and replayed in event-time order
through the daemon's own feature code on a scratch key prefix (behaviour recomputed from the
first transaction of the period, the live blocklists copied in), then scored by the candidate with
``score_batch``, as a worker would. Nothing live is touched. The report says which decisions would
change and how recall and precision against the labels would move.

Behaviour state that the live pipeline carried in from before the period is not there at its
start: give ``--since`` a day more than the period you care about.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis

from fraudd.keys import Keys
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import BLOCKLIST_KINDS
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.model import FraudModel
from fraudd.scoring.rules import DECISIONS, Rules
from fraudd.scoring.worker import score_batch

from .history import BATCH, TrainingError
from .store import StoredHistory


@dataclass
class Backtest:
    transactions: int
    changed: Counter  # (stored decision, candidate decision) -> count, where they differ
    examples: list[tuple[str, str, str]]  # (transaction_id, stored, candidate), a few
    stored_figures: tuple[int, float, float]  # alerts, recall, precision against labels
    candidate_figures: tuple[int, float, float]
    labelled: int
    fraud: int


def _figures(flagged: np.ndarray, fraud: np.ndarray) -> tuple[int, float, float]:
    caught = int((flagged & fraud).sum())
    return int(flagged.sum()), caught / max(int(fraud.sum()), 1), caught / max(int(flagged.sum()), 1)


def backtest(
    client: redis.Redis,
    live_keys: Keys,
    stored: StoredHistory,
    model: FraudModel,
    rules: Rules,
    review: float,
    decline: float,
    progress: Callable[[str], None],
) -> Backtest:
    scratch = Keys(f"fraudd-backtest-{uuid.uuid4().hex}:raw", "unused:fraud", "unused:dlq")
    for kind in BLOCKLIST_KINDS:
        members = client.smembers(live_keys.blocklist(kind))
        if members:
            client.sadd(scratch.blocklist(kind), *members)
    store = SharedFeatureStore(client, scratch, dedup_window_ms=3_600_000)
    payloads = stored.history.payloads
    decided: list[np.ndarray] = []
    try:
        for start in range(0, len(payloads), BATCH):
            chunk = payloads[start : start + BATCH]
            batch = decode_batch([f"{start + i + 1}-0" for i in range(len(chunk))], chunk)
            if batch.rejected:
                raise TrainingError(
                    f"stored transaction {stored.transaction_ids[start]} no longer decodes: "
                    f"{batch.rejected[0].reason}: {batch.rejected[0].detail}"
                )
            decision = score_batch(model, rules, store.compute(batch), review, decline, explain=False).decision
            decided.append(decision)
            if (start // BATCH) % 50 == 49:
                progress(f"replayed {start + len(chunk):,}/{len(payloads):,} transactions")
    finally:
        keys = list(client.scan_iter(match=f"{scratch.prefix}*", count=10_000))
        for begin in range(0, len(keys), 1000):
            client.delete(*keys[begin : begin + 1000])
    candidate = np.concatenate(decided) if decided else np.empty(0, np.int8)
    index = {name: i for i, name in enumerate(DECISIONS)}
    before = np.fromiter((index[d] for d in stored.decisions), np.int8, len(stored.decisions))
    differ = np.flatnonzero(before != candidate)
    changed = Counter((DECISIONS[before[i]], DECISIONS[candidate[i]]) for i in differ.tolist())
    examples = [(stored.transaction_ids[i], DECISIONS[before[i]], DECISIONS[candidate[i]]) for i in differ[:10].tolist()]
    fraud = stored.history.is_fraud
    return Backtest(
        len(candidate),
        changed,
        examples,
        _figures(before > 0, fraud),
        _figures(candidate > 0, fraud),
        int(stored.labelled.sum()),
        int(fraud.sum()),
    )


def format_backtest(result: Backtest, since: str, model: FraudModel, rules: Rules) -> str:
    lines = [
        f"{result.transactions:,} stored transactions of the last {since} replayed through model {model.version}, "
        f"rules {rules.version}",
        f"decisions that would change: {sum(result.changed.values()):,}",
    ]
    lines += [f"  {stored} -> {candidate}: {count:,}" for (stored, candidate), count in sorted(result.changed.items())]
    lines += [f"  e.g. {txid}: {stored} -> {candidate}" for txid, stored, candidate in result.examples[:5]]
    lines.append(f"against {result.labelled:,} labels ({result.fraud:,} fraud; unlabelled counts as legitimate):")
    for name, (alerts, recall, precision) in (("stored", result.stored_figures), ("candidate", result.candidate_figures)):
        lines.append(f"  {name:10} alerts {alerts:,}, recall {recall:.1%}, precision {precision:.1%}")
    return "\n".join(lines)
