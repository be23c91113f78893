"""How far the traffic a scoring worker sees has drifted from its model's training sample.

The worker counts the rows it scores into the deciding model's ``FeatureBins`` (``bins.py``), one
binary search per feature per batch over every ``SAMPLE_EVERY``-th row (0.15 CPU-µs per transaction at 500-row batches),
keeps the counts of about the last ``WINDOW_ROWS`` rows sampled (older batches weigh exponentially
less) and publishes each feature's PSI about once a second as
``fraudd_feature_psi``. A model trained before the bins were stored has none and exports no PSI.
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime import metrics
from .features import Features
from .model import FraudModel

SAMPLE_EVERY = 4
WINDOW_ROWS = 5_000  # sampled rows: about the last 20,000 transactions
MIN_ROWS = 500  # fewer rows in the window and the PSI is noise: nothing is published
PUBLISH_INTERVAL_S = 1.0


class Drift:
    """One worker's PSI of the traffic it scores against the deciding model's training sample."""

    def __init__(self, model: FraudModel) -> None:
        self._model = model
        self._bins = model.feature_bins
        self._names = model.feature_names
        self._counts = None if self._bins is None else np.zeros_like(self._bins.shares)
        self._next_publish = 0.0

    def observe(self, features: Features) -> None:
        if self._bins is None or self._counts is None or len(features) == 0:
            return
        sample = self._model.inputs(features)[::SAMPLE_EVERY]  # the columns of the model's own contract
        self._counts *= np.exp(-len(sample) / WINDOW_ROWS)
        self._counts += self._bins.counts(sample)
        now = time.monotonic()
        if now >= self._next_publish and self._counts[0].sum() >= MIN_ROWS:
            self._next_publish = now + PUBLISH_INTERVAL_S
            for name, value in zip(self._names, self._bins.psi(self._counts).tolist()):
                metrics.feature_psi.labels(name).set(value)
