"""The feature vector a decision was made from, stored beside its row so rules can be re-run on it.

One float32 per ``VECTOR_COLUMNS`` entry: the model features, the label-fed confirmed-fraud counts,
the blocklist flags, and the model's own decision (its thresholds applied to its score, before any
rule). That is everything a rule set reads except ``amount``, which the row already holds in double
precision, so a candidate rule set evaluated on stored vectors decides exactly as the live pipeline
would have (``fraudd rules test``). Packed and unpacked for a whole batch at once, never per row.

The stored layout only grows at its end: a column is appended, never moved or removed, so a vector
stored under an earlier layout is a prefix of today's, told apart by its length alone. Read back, its
missing columns are 0: a blocklist added since, such as ``card``, reads as not
blocked on the rows stored before it existed, which is what those decisions saw
(``fraudd.rulesets.backtest`` pads them so in the COPY that reads them).
"""

from __future__ import annotations

import numpy as np

from .confirmed import CONFIRMED_COLUMNS
from .features import BLOCKLIST_KINDS, FEATURE_NAMES, Features

MODEL_DECISION = "model_decision"
# The first stored layout, as rows hold it; every later column follows it.
_FIRST_LAYOUT: tuple[str, ...] = (
    *FEATURE_NAMES,
    *CONFIRMED_COLUMNS,
    *(f"blocked_{kind}" for kind in ("merchant", "device", "ip", "country")),
    MODEL_DECISION,
)
VECTOR_COLUMNS: tuple[str, ...] = (
    *_FIRST_LAYOUT,
    *(f"blocked_{kind}" for kind in BLOCKLIST_KINDS if f"blocked_{kind}" not in _FIRST_LAYOUT),
)
VECTOR_BYTES = 4 * len(VECTOR_COLUMNS)
# The byte lengths of the vectors of every layout, oldest first (today's last).
LAYOUT_BYTES: tuple[int, ...] = (4 * len(_FIRST_LAYOUT), VECTOR_BYTES)
_AT = {name: j for j, name in enumerate(VECTOR_COLUMNS)}
_CONFIRMED_AT = len(FEATURE_NAMES)


def pack(features: Features, model_decision: np.ndarray) -> np.ndarray:
    """The batch's vectors, float32 (n, len(VECTOR_COLUMNS))."""
    n = len(features)
    out = np.empty((n, len(VECTOR_COLUMNS)), dtype=np.float32)
    out[:, :_CONFIRMED_AT] = features.matrix
    for name in CONFIRMED_COLUMNS:
        out[:, _AT[name]] = features.column(name)
    for kind in BLOCKLIST_KINDS:
        out[:, _AT[f"blocked_{kind}"]] = features.blocked[kind]
    out[:, _AT[MODEL_DECISION]] = model_decision
    return out


def unpack(vectors: np.ndarray, amount: np.ndarray) -> tuple[Features, np.ndarray]:
    """Features (as the rules read them) and the model's decisions of stored vectors, in today's
    layout (older ones padded with zeros)."""
    n = len(vectors)
    features = Features(
        matrix=vectors[:, :_CONFIRMED_AT],
        seen=np.zeros(n, dtype=bool),
        event_ms=np.zeros(n, dtype=np.int64),
        blocked={kind: vectors[:, _AT[f"blocked_{kind}"]] != 0 for kind in BLOCKLIST_KINDS},
        amount=amount,
        confirmed={name: vectors[:, _AT[name]] for name in CONFIRMED_COLUMNS},
    )
    return features, vectors[:, _AT[MODEL_DECISION]].astype(np.int8)


def stored(vectors: np.ndarray) -> np.ndarray:
    """The vectors as their ``bytea`` holds them: little-endian float32, row after row."""
    return np.ascontiguousarray(vectors, dtype="<f4")


def copy_text(vectors: np.ndarray) -> list[str]:
    """Each row's ``bytea`` in COPY text format (``\\\\x`` and hex): one hex conversion of the whole
    batch, then a slice per row (≈ 1 µs per row; numpy's own string arrays took three times that)."""
    width = 2 * VECTOR_BYTES
    text = stored(vectors).tobytes().hex()
    return ["\\\\x" + text[i : i + width] for i in range(0, len(text), width)]
