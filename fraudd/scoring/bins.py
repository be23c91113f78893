"""A training sample's per-feature bins, stored in the model's metadata, that drift is measured against.

``fraudd train`` stores each feature's decile edges over the rows the trees were fitted on and the
share of those rows in each bin. The population stability index of live rows against them is
PSI = Σ (live − train) · ln(live / train) over the bins: under 0.1 the feature looks as in
training, above 0.2 the model is scoring a population it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

BINS = 10
_FLOOR = 1e-4  # an empty bin counts as this share, so one empty bin does not make the PSI infinite


@dataclass(frozen=True, slots=True)
class FeatureBins:
    """Per feature: the inner bin edges (padded with +inf to one width) and the training shares."""

    edges: np.ndarray  # float32 (features, BINS - 1)
    shares: np.ndarray  # float64 (features, BINS)
    valid: np.ndarray  # bool (features, BINS): the bins a feature really has

    @classmethod
    def of(cls, matrix: np.ndarray) -> FeatureBins:
        """The decile bins of a training sample (repeated quantiles of discrete features merge)."""
        quantiles = np.quantile(matrix, np.arange(1, BINS) / BINS, axis=0).T
        rows = [np.unique(row[np.isfinite(row)]) for row in quantiles]
        return cls.from_lists([row.tolist() for row in rows], None, matrix)

    @classmethod
    def from_lists(
        cls, edges: list[list[float]], shares: list[list[float]] | None, sample: np.ndarray | None = None
    ) -> FeatureBins:
        padded = np.full((len(edges), BINS - 1), np.inf, dtype=np.float32)
        valid = np.zeros((len(edges), BINS), dtype=bool)
        for j, row in enumerate(edges):
            padded[j, : len(row)] = row
            valid[j, : len(row) + 1] = True
        bins = cls(padded, np.zeros((len(edges), BINS)), valid)
        if sample is not None:
            counts = bins.counts(sample)
            return cls(padded, counts / max(len(sample), 1), valid)
        table = np.zeros((len(edges), BINS))
        for j, row in enumerate(shares or []):
            table[j, : len(row)] = row
        return cls(padded, table, valid)

    def counts(self, matrix: np.ndarray) -> np.ndarray:
        """Rows per (feature, bin), float64 (features, BINS): a binary search per column into its
        edges (a loop over the features, not the rows) and one bincount."""
        width = self.edges.shape[0]
        index = np.empty(matrix.shape, dtype=np.intp)
        for j in range(width):
            index[:, j] = np.searchsorted(self.edges[j], matrix[:, j], side="right")
        index += np.arange(width) * BINS
        return np.bincount(index.ravel(), minlength=width * BINS).reshape(width, BINS).astype(np.float64)

    def psi(self, counts: np.ndarray) -> np.ndarray:
        """Each feature's PSI of ``counts`` (as from ``counts``) against the training shares."""
        live = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
        live, train = np.maximum(live, _FLOOR), np.maximum(self.shares, _FLOOR)
        psi: np.ndarray = np.where(self.valid, (live - train) * np.log(live / train), 0.0).sum(axis=1)
        return psi

    def dumps(self) -> str:
        edges = [row[: int(valid.sum()) - 1].tolist() for row, valid in zip(self.edges, self.valid)]
        shares = [row[: int(valid.sum())].round(6).tolist() for row, valid in zip(self.shares, self.valid)]
        return orjson.dumps({"bins": BINS, "edges": edges, "shares": shares}).decode()

    @classmethod
    def loads(cls, text: str, width: int) -> FeatureBins:
        """From model metadata; ``ValueError`` when it does not describe ``width`` features."""
        document = orjson.loads(text)
        edges, shares = document.get("edges"), document.get("shares")
        if document.get("bins") != BINS or not isinstance(edges, list) or not isinstance(shares, list):
            raise ValueError("not a table of bin edges and shares")
        if len(edges) != width or len(shares) != width:
            raise ValueError(f"{len(edges)} features' bins for {width} features")
        if any(len(e) >= BINS or len(s) != len(e) + 1 for e, s in zip(edges, shares)):
            raise ValueError("a feature's shares do not match its edges")
        return cls.from_lists(edges, shares)
