"""The feature vector a decision was made from, stored beside its row so rules can be re-run on it.

One float32 per ``VECTOR_COLUMNS`` entry: the model features, the label-fed confirmed-fraud counts,
the blocklist flags, and the model's own decision (its thresholds applied to its score, before any
rule). That is everything a rule set reads except ``amount``, which the row already holds in double
precision, so a candidate rule set evaluated on stored vectors decides exactly as the live pipeline
would have (``fraudd rules test``). Packed and unpacked for a whole batch at once, never per row.
"""

from __future__ import annotations

import numpy as np

from .confirmed import CONFIRMED_COLUMNS
from .features import BLOCKLIST_KINDS, FEATURE_NAMES, Features

MODEL_DECISION = "model_decision"
VECTOR_COLUMNS: tuple[str, ...] = (
    *FEATURE_NAMES,
    *CONFIRMED_COLUMNS,
    *(f"blocked_{kind}" for kind in BLOCKLIST_KINDS),
    MODEL_DECISION,
)
VECTOR_BYTES = 4 * len(VECTOR_COLUMNS)
_CONFIRMED_AT = len(FEATURE_NAMES)
_BLOCKED_AT = _CONFIRMED_AT + len(CONFIRMED_COLUMNS)


def pack(features: Features, model_decision: np.ndarray) -> np.ndarray:
    """The batch's vectors, float32 (n, len(VECTOR_COLUMNS))."""
    n = len(features)
    out = np.empty((n, len(VECTOR_COLUMNS)), dtype=np.float32)
    out[:, :_CONFIRMED_AT] = features.matrix
    for j, name in enumerate(CONFIRMED_COLUMNS, start=_CONFIRMED_AT):
        out[:, j] = features.column(name)
    for j, kind in enumerate(BLOCKLIST_KINDS, start=_BLOCKED_AT):
        out[:, j] = features.blocked[kind]
    out[:, -1] = model_decision
    return out


def unpack(vectors: np.ndarray, amount: np.ndarray) -> tuple[Features, np.ndarray]:
    """Features (as the rules read them) and the model's decisions of stored vectors."""
    n = len(vectors)
    features = Features(
        matrix=vectors[:, :_CONFIRMED_AT],
        seen=np.zeros(n, dtype=bool),
        event_ms=np.zeros(n, dtype=np.int64),
        blocked={kind: vectors[:, j] != 0 for j, kind in enumerate(BLOCKLIST_KINDS, start=_BLOCKED_AT)},
        amount=amount,
        confirmed={name: vectors[:, j] for j, name in enumerate(CONFIRMED_COLUMNS, start=_CONFIRMED_AT)},
    )
    return features, vectors[:, -1].astype(np.int8)


def copy_text(vectors: np.ndarray) -> list[str]:
    """Each row's ``bytea`` in COPY text format (``\\\\x`` and hex): one hex conversion of the whole
    batch, then a slice per row (≈ 1 µs per row; numpy's own string arrays took three times that)."""
    width = 2 * VECTOR_BYTES
    text = np.ascontiguousarray(vectors, dtype="<f4").tobytes().hex()
    return ["\\\\x" + text[i : i + width] for i in range(0, len(text), width)]
