"""A read's shards as one batch: what the worker scores in one inference call.

A worker owning several shards reads them together, and each shard's part of the read is decoded,
its features committed and its outcome settled under its own lease. Scoring needs none of that:
the model, the rules and the explanations see rows, whatever shard they came from, and most of
their cost is per call (the ONNX session, each rule's numpy pass, the metrics), not per row. So the
parts are joined for the scoring and the result is split back into the parts, row for row, in the
order they were joined.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from .decode import DecodedBatch
from .features import Features
from .sinks import ScoredBatch


def batches(parts: Sequence[DecodedBatch]) -> DecodedBatch:
    """The parts' rows one after the other (their rejections stay with the parts)."""
    if len(parts) == 1:
        return parts[0]
    columns: dict[str, Any] = {
        field.name: _joined([getattr(part, field.name) for part in parts])
        for field in dataclasses.fields(DecodedBatch)
        if field.name != "rejected"
    }
    return DecodedBatch(**columns)


def features(parts: Sequence[Features]) -> Features:
    """The parts' features one after the other. The rule-set pointer is the first part's: one
    version decides the whole read (the pointers of a worker's shards differ only while a publish
    is writing them, and the next read follows it)."""
    if len(parts) == 1:
        return parts[0]
    return Features(
        matrix=np.concatenate([part.matrix for part in parts]),
        seen=np.concatenate([part.seen for part in parts]),
        event_ms=np.concatenate([part.event_ms for part in parts]),
        blocked={kind: np.concatenate([part.blocked[kind] for part in parts]) for kind in parts[0].blocked},
        amount=np.concatenate([part.amount for part in parts]),
        confirmed={name: np.concatenate([part.column(name) for part in parts]) for name in parts[0].confirmed},
        published_rules=parts[0].published_rules,
    )


def split(scored: ScoredBatch, parts: Sequence[DecodedBatch]) -> list[ScoredBatch]:
    """``scored``, the scoring of ``batches(parts)``, back as one scored batch per part."""
    if len(parts) == 1:
        return [scored]
    bounds = list(itertools.accumulate((len(part) for part in parts), initial=0))
    return [scored.take(range(start, end), part) for part, start, end in zip(parts, bounds, bounds[1:])]


def _joined(columns: list[list[object]] | list[np.ndarray]) -> list[object] | np.ndarray:
    if isinstance(columns[0], np.ndarray):
        return np.concatenate(columns)
    return list(itertools.chain.from_iterable(columns))  # in C, not a Python step per value
