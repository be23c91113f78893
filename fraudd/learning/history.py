"""Labelled history, before any model is fitted: where ``fraudd train``, ``fraudd retrain`` and
``fraudd backtest`` get their transactions and the daemon's features of them.

Features are computed by streaming the history, in time order, through the daemon's own
``SharedFeatureStore`` on a scratch key prefix that is deleted afterwards, so a model is trained on
exactly what the live pipeline computes. Sources: a JSON Lines history file (DESIGN.md's input
message plus ``label``), the stored rows of the team's own PostgreSQL joined with their labels
(``store.py``), or ``fraudd.generator``'s seeded stream (how the shipped
``fraudd/scoring/fraud.onnx`` is made).

Why apart from ``train.py``: none of this needs the training libraries (LightGBM, scikit-learn,
ONNX), whose import takes seconds, so a history that cannot train a model is refused before they
are loaded, and the commands that only replay history never load them.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import redis

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.keys import Keys
from fraudd.scoring.decode import decode_batch
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.features_shared import SharedFeatureStore
from fraudd.scoring.model import LABEL_FEATURE_NAMES

from .confirmed_history import confirmed_counts
from .labels import LabelError, reported_time

BATCH = 1000
# Below this many fraudulent transactions in a part of the split, its figures are noise.
MIN_POSITIVES = {"fit": 50, "tune": 10, "holdout": 10}
_LABELS = {1: True, 0: False}  # true/false too: they equal 1/0
Progress = Callable[[str], None]


class TrainingError(RuntimeError):
    """The data cannot train a model; the message names the problem in one line."""


@dataclass
class Dataset:
    matrix: np.ndarray  # float32 (n, len(feature_names)), in time order
    is_fraud: np.ndarray  # bool (n,)
    typology: np.ndarray  # int codes into ``names``; 0 = legit or unknown
    names: tuple[str, ...]
    timestamp: np.ndarray  # float64 Unix seconds (n,)
    feature_names: tuple[str, ...] = FEATURE_NAMES  # the feature contract of ``matrix``'s columns

    def __len__(self) -> int:
        return len(self.is_fraud)

    def take(self, rows: slice | np.ndarray) -> Dataset:
        return Dataset(
            self.matrix[rows], self.is_fraud[rows], self.typology[rows], self.names, self.timestamp[rows], self.feature_names
        )


@dataclass
class History:
    """Labelled input messages in time order, before featurizing."""

    payloads: list[bytes]
    is_fraud: np.ndarray
    typology: np.ndarray
    names: tuple[str, ...]
    source: str  # the file or table, for error messages and the model card
    line_numbers: list[int] | None = None  # of each payload in the file, for error messages
    # When each label was reported, Unix seconds (NaN: not said, taken as event time + a delay).
    reported_at: np.ndarray | None = None


def quiet(_message: str) -> None:
    pass


def featurize(client: redis.Redis, history: History, progress: Progress = quiet, label_delay_s: float | None = None) -> Dataset:
    """The live features of ``history``, computed by the daemon's feature store in its order.

    With ``label_delay_s``, the label-fed confirmed-fraud counts too (``LABEL_FEATURE_NAMES``), point
    in time: a fraud counts for a row only once reported, when the history says, else that long
    after the fraud happened.
    """
    scratch = Keys(f"fraudd-train-{uuid.uuid4().hex}:raw", "unused:fraud", "unused:dlq")
    store = SharedFeatureStore(client, scratch, dedup_window_ms=3_600_000)
    payloads = history.payloads
    parts, timestamps = [], []
    entities: tuple[list[str | None], ...] = ([], [], [], [])
    started = last_report = time.monotonic()
    try:
        for start in range(0, len(payloads), BATCH):
            chunk = payloads[start : start + BATCH]
            batch = decode_batch([f"{start + i + 1}-0" for i in range(len(chunk))], chunk)
            if batch.rejected:
                bad = batch.rejected[0]
                row = int(bad.entry_id.split("-")[0]) - 1
                where = f"line {history.line_numbers[row]}" if history.line_numbers else f"row {row + 1}"
                raise TrainingError(f"{history.source} {where}: {bad.reason}: {bad.detail}")
            parts.append(store.compute(batch).matrix)
            timestamps.append(batch.timestamp)
            values_of: tuple[Sequence[str | None], ...] = (batch.merchant, batch.device_id, batch.ip, batch.card_id)
            for column, values in zip(entities, values_of):
                column.extend(values)
            done = start + len(chunk)
            now = time.monotonic()
            if now - last_report >= 2.0 or done == len(payloads):
                last_report = now
                progress(f"features: {done:,}/{len(payloads):,} transactions ({done / max(now - started, 1e-9):,.0f}/s)")
    finally:
        for keys in _chunks(list(client.scan_iter(match=f"{scratch.prefix}*", count=10_000)), 1000):
            client.delete(*keys)
    matrix = np.concatenate(parts) if parts else np.empty((0, len(FEATURE_NAMES)), np.float32)
    stamps = np.concatenate(timestamps) if timestamps else np.empty(0)
    if label_delay_s is None:
        return Dataset(matrix, history.is_fraud, history.typology, history.names, stamps)
    reported = np.full(len(stamps), np.nan) if history.reported_at is None else history.reported_at
    reported = np.where(np.isnan(reported), stamps + label_delay_s, reported)
    counts = confirmed_counts(
        entities, np.round(stamps * 1000).astype(np.int64), history.is_fraud, np.round(reported * 1000).astype(np.int64)
    )
    return Dataset(np.hstack([matrix, counts]), history.is_fraud, history.typology, history.names, stamps, LABEL_FEATURE_NAMES)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_history(path: Path, progress: Progress = quiet) -> History:
    """A labelled history file: one input message per line plus ``label`` (1/0 or true/false).

    An optional ``typology`` (text) per line lets the model card report recall per kind of fraud;
    ``legit`` is the name of the non-fraud kind. Blank lines are skipped. The first line that
    cannot be used raises ``TrainingError`` naming it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    payloads: list[bytes] = []
    labels: list[bool] = []
    kinds: list[str] = []
    numbers: list[int] = []
    reported: list[float] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise TrainingError(f"{path} line {number}: not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise TrainingError(f"{path} line {number}: not a JSON object")
        label = message.get("label")
        if label.__class__ not in (int, bool) or label not in _LABELS:
            raise TrainingError(f"{path} line {number}: 'label' must be 1/0 or true/false, got {label!r}")
        try:
            reported.append(math.nan if message.get("reported_at") is None else reported_time(message["reported_at"]).timestamp())
        except LabelError as exc:
            raise TrainingError(f"{path} line {number}: {exc}") from None
        payloads.append(line)
        labels.append(_LABELS[label])
        kinds.append(str(message.get("typology") or ("fraud" if _LABELS[label] else "legit")))
        numbers.append(number)
        if number % 200_000 == 0:
            progress(f"read {number:,} lines of {path}")
    if not payloads:
        raise TrainingError(f"{path}: no transactions")
    names = ("legit", *sorted(set(kinds) - {"legit"}))
    codes = {name: code for code, name in enumerate(names)}
    return History(
        payloads,
        np.array(labels, dtype=bool),
        np.array([codes[k] for k in kinds], dtype=np.int16),
        names,
        str(path),
        numbers,
        np.array(reported, dtype=np.float64),
    )


def generated_history(seed: int, n: int) -> History:
    """``n`` transactions of ``fraudd.generator``'s stream for ``seed``, with their typologies."""
    generated = TransactionGenerator(GeneratorConfig(seed=seed)).generate(n)
    return History(
        generated.payloads(),
        generated.is_fraud,
        generated.typology.astype(np.int16),
        generated.typology_names,
        f"fraudd.generator seed {seed}",
    )


def dataset(client: redis.Redis, seed: int, n: int, label_delay_s: float | None = None) -> Dataset:
    """The generator's stream for ``seed`` with live features (the shipped model's data)."""
    return featurize(client, generated_history(seed, n), label_delay_s=label_delay_s)


def split_bounds(n: int, holdout_share: float, tune_share: float) -> tuple[slice, slice, slice]:
    """(fit, tune, holdout) row ranges: the most recent ``holdout_share`` of the rows is held out,
    the ``tune_share`` before it sets thresholds; rows are in time order."""
    holdout_start = int(round(n * (1.0 - holdout_share)))
    tune_start = int(round(holdout_start - n * tune_share))
    return slice(0, tune_start), slice(tune_start, holdout_start), slice(holdout_start, n)


def check_positives(is_fraud: np.ndarray, parts: tuple[slice, slice, slice]) -> None:
    """Refuse a split with too few frauds in a part, before any feature is computed."""
    for name, rows in zip(("fit", "tune", "holdout"), parts):
        positives = int(is_fraud[rows].sum())
        if positives < MIN_POSITIVES[name]:
            raise TrainingError(
                f"too few fraudulent transactions: {positives} in the {name} part of the time split "
                f"({len(is_fraud[rows]):,} transactions); at least {MIN_POSITIVES[name]} are needed "
                f"({int(is_fraud.sum())} labelled fraud in all)"
            )


def data_version(history: History) -> str:
    """A short digest of the training data, so a model's version names what it learnt from."""
    digest = hashlib.sha256()
    for payload in history.payloads[:: max(1, len(history.payloads) // 10_000)]:
        digest.update(payload)
    digest.update(history.is_fraud.tobytes())
    return digest.hexdigest()[:8]
