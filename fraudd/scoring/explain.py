"""Exact per-feature contributions of the deployed tree model, in log-odds (path-dependent TreeSHAP).

An analyst, a regulator or a customer asking "why" must get the features that actually moved this
score, by how much, and in which direction: base value + the sum of the contributions is the
model's raw score exactly (up to float rounding), and each contribution is the feature's Shapley
value under the trees' own training distribution, as LightGBM's ``pred_contrib`` computes it.

The explainer reads the trees from the ONNX file the daemon scores with, so it explains the model
that decided, never a copy. Path-dependent TreeSHAP needs each node's cover (how many training rows
reached it): ``fraudd train`` writes it into the ensemble's ``nodes_hitrates`` attribute, which
onnxruntime does not use for scoring. A model without covers has no explainer.

Why it is cheap enough for every flagged row: a leaf's share of a feature's Shapley value depends
only on which of the leaf's path features the row agrees with (one bit per distinct feature on the
path, ``d`` <= the tree depth). So every leaf's contributions are tabulated once at load for all
``2**d`` agreement patterns, and explaining a batch is one comparison of the rows against each
distinct interval the paths allow a feature (far fewer than the paths' slots: leaves share splits),
each leaf's pattern assembled from its intervals' bits, a gather from the tables and one sum per
feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

# Tables hold 2**d * d values per leaf; a model whose leaves need more than this in total (very deep
# trees over many distinct features) is not tabulated and keeps the reason-code proxy.
MAX_TABLE_VALUES = 1 << 24
# Rows explained at a time. Every intermediate array holds a block's rows as its inner axis, so a
# gather moves them together and each numpy call's fixed cost is shared by the block; a block's
# shares (8 bytes per path slot and row: ≈ 60 KB a row for the default model) still have to stay
# in the CPU's cache. On the 2-core reference box a row cost ≈ 23 µs in blocks of 8, ≈ 19-21 µs in
# blocks of 16 to 64 and up to twice that in blocks of 128 (it was ≈ 85 µs with the rows as the
# outer axis); 32 takes the flagged rows of a default 1,000-entry read (≈ 2.7%) in one block.
EXPLAIN_BLOCK_ROWS = 32


class ExplainerError(ValueError):
    """The model cannot be explained exactly (no covers, or not a single tree ensemble)."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Contributions of a batch's rows: ``base + contributions[i].sum()`` is row i's raw log-odds."""

    base: float
    contributions: np.ndarray  # float64, rows × features


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A leaf, seen as the distinct features on its path: for each, the interval its splits allow."""

    value: float
    features: list[int]  # distinct features on the path, in order of first split
    zero_fractions: list[float]  # per feature: the share of training rows its splits let through
    lower: list[float]  # per feature: the path needs value > lower ...
    upper: list[float]  # ... and value <= upper
    missing_agrees: list[bool]  # per feature: a missing value follows the path at every split


class TreeExplainer:
    """Exact contributions of one ONNX ``TreeEnsembleClassifier`` with a logistic output."""

    def __init__(self, leaves: list[_Leaf], width: int, base: float) -> None:
        self.base = float(base)
        self.width = width
        # A one-leaf tree only moves the base. The deepest leaves first: the leaves with a j-th path
        # feature are then a prefix, so patterns are built one position at a time on slices.
        leaves = sorted((leaf for leaf in leaves if leaf.features), key=lambda leaf: -len(leaf.features))
        depths = np.array([len(leaf.features) for leaf in leaves], dtype=np.int64)
        table_sizes = (1 << depths) * depths
        if int(table_sizes.sum()) > MAX_TABLE_VALUES:
            raise ExplainerError(f"trees too deep to tabulate ({int(table_sizes.sum()):,} values)")

        # A row is compared once per distinct (feature, lower, upper, missing) interval, and a
        # leaf's pattern is the sum of its intervals' agreement bits, each weighted 2**position.
        intervals: dict[tuple[int, float, float, bool], int] = {}
        leaf_intervals = [
            [intervals.setdefault(key, len(intervals)) for key in zip(leaf.features, leaf.lower, leaf.upper, leaf.missing_agrees)]
            for leaf in leaves
        ]
        self._interval_feature = np.array([key[0] for key in intervals], dtype=np.intp)
        self._lower = np.array([key[1] for key in intervals], dtype=np.float32)[:, None]
        self._upper = np.array([key[2] for key in intervals], dtype=np.float32)[:, None]
        self._missing_agrees = np.array([key[3] for key in intervals], dtype=bool)[:, None]
        max_depth = int(depths.max(initial=0))
        self._position_intervals = [
            np.array([ids[position] for ids in leaf_intervals if len(ids) > position], dtype=np.intp)
            for position in range(max_depth)
        ]
        self._pattern_type = np.min_scalar_type((1 << max_depth) - 1).type

        # One "slot" per (leaf, path feature), in feature order, each with its leaf's shares for
        # every pattern side by side: a slot's share is table[slot offset + its leaf's pattern], the
        # gather sweeps the table forwards, and one reduceat over at most `width` segments sums the
        # slots per feature.
        slots = sorted(
            (feature, leaf, position) for leaf, path in enumerate(leaves) for position, feature in enumerate(path.features)
        )
        tables = [_leaf_table(leaf) for leaf in leaves]
        self._table = np.concatenate([tables[leaf][:, position] for _, leaf, position in slots] or [np.zeros(0)])
        self._slot_leaf = np.array([leaf for _, leaf, _ in slots], dtype=np.intp)
        slot_sizes = np.array([1 << len(leaves[leaf].features) for _, leaf, _ in slots], dtype=np.int64)
        self._slot_offset = (np.cumsum(slot_sizes) - slot_sizes).astype(np.int32)[:, None]
        slot_feature = np.array([feature for feature, _, _ in slots], dtype=np.int64)
        self._features_present, self._feature_first = np.unique(slot_feature, return_index=True)

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, width: int) -> TreeExplainer:
        """The explainer of the model's tree ensemble; ``ExplainerError`` when it cannot be exact."""
        ensembles = [node for node in model.graph.node if node.op_type == "TreeEnsembleClassifier"]
        if len(ensembles) != 1:
            raise ExplainerError("not a single TreeEnsembleClassifier")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in ensembles[0].attribute}
        if attributes.get("post_transform", b"NONE") != b"LOGISTIC":
            raise ExplainerError("the ensemble's output is not logistic")
        if len(attributes.get("classlabels_int64s", [])) != 2 or len(set(attributes["class_ids"])) != 1:
            raise ExplainerError("not a binary classifier with one score per leaf")
        covers = np.asarray(attributes.get("nodes_hitrates", []), dtype=np.float64)
        if len(covers) != len(attributes["nodes_nodeids"]) or np.all(covers == 1.0):
            raise ExplainerError("the model carries no node covers (train it again with `fraudd train`)")
        leaves, base = _leaves(attributes, covers)
        return cls(leaves, width, base)

    def explain(self, matrix: np.ndarray) -> Explanation:
        """Contributions of every row of ``matrix`` (rows × features, as scored)."""
        rows = len(matrix)
        contributions = np.zeros((rows, self.width))
        if rows == 0 or len(self._table) == 0:
            return Explanation(self.base, contributions)
        for start in range(0, rows, EXPLAIN_BLOCK_ROWS):
            block = np.ascontiguousarray(matrix[start : start + EXPLAIN_BLOCK_ROWS].T)  # features × rows
            values = block.take(self._interval_feature, axis=0)
            agrees = (values > self._lower) & (values <= self._upper)
            if np.isnan(block).any():
                agrees = np.where(np.isnan(values), self._missing_agrees, agrees)
            pattern = agrees.take(self._position_intervals[0], axis=0).astype(self._pattern_type)
            for position, ids in enumerate(self._position_intervals[1:], 1):
                pattern[: len(ids)] += agrees.take(ids, axis=0) * self._pattern_type(1 << position)
            shares = self._table.take(pattern.take(self._slot_leaf, axis=0) + self._slot_offset)
            contributions[start : start + EXPLAIN_BLOCK_ROWS, self._features_present] = np.add.reduceat(
                shares, self._feature_first, axis=0
            ).T
        return Explanation(self.base, contributions)


def _leaves(attributes: dict[str, Any], covers: np.ndarray) -> tuple[list[_Leaf], float]:
    """Every leaf with its path, and the base value (the cover-weighted mean of the leaf values)."""
    tree_ids = attributes["nodes_treeids"]
    node_ids = attributes["nodes_nodeids"]
    index = {(tree, node): i for i, (tree, node) in enumerate(zip(tree_ids, node_ids))}
    modes = attributes["nodes_modes"]
    if any(mode not in (b"LEAF", b"BRANCH_LEQ") for mode in modes):
        raise ExplainerError("splits other than `<=` are not supported")
    leaf_values: dict[int, float] = {}
    for tree, node, weight in zip(attributes["class_treeids"], attributes["class_nodeids"], attributes["class_weights"]):
        leaf_values[index[(tree, node)]] = leaf_values.get(index[(tree, node)], 0.0) + weight
    base = float(sum(attributes.get("base_values", [0.0])))
    leaves: list[_Leaf] = []
    branches = zip(tree_ids, modes, attributes["nodes_truenodeids"], attributes["nodes_falsenodeids"])
    children = {(tree, child) for tree, mode, true, false in branches if mode != b"LEAF" for child in (true, false)}
    roots = [i for i, (tree, node) in enumerate(zip(tree_ids, node_ids)) if (tree, node) not in children]
    missing_true = attributes.get("nodes_missing_value_tracks_true") or [0] * len(node_ids)
    for root in roots:
        tree = tree_ids[root]
        stack: list[tuple[int, list[tuple[int, bool]]]] = [(root, [])]
        while stack:
            i, path = stack.pop()
            if modes[i] == b"LEAF":
                leaf = _leaf(leaf_values.get(i, 0.0), path, attributes, index, covers, missing_true)
                leaves.append(leaf)
                base += leaf.value * covers[i] / covers[root]
                continue
            stack.append((index[(tree, attributes["nodes_truenodeids"][i])], [*path, (i, True)]))
            stack.append((index[(tree, attributes["nodes_falsenodeids"][i])], [*path, (i, False)]))
    return leaves, base


def _leaf(
    value: float,
    path: list[tuple[int, bool]],
    attributes: dict[str, Any],
    index: dict[tuple[int, int], int],
    covers: np.ndarray,
    missing_true: list[int],
) -> _Leaf:
    leaf = _Leaf(value, [], [], [], [], [])
    tree_ids = attributes["nodes_treeids"]
    for i, went_true in path:
        feature = attributes["nodes_featureids"][i]
        child_id = attributes["nodes_truenodeids" if went_true else "nodes_falsenodeids"][i]
        child = index[(tree_ids[i], child_id)]
        if feature not in leaf.features:
            leaf.features.append(feature)
            leaf.zero_fractions.append(1.0)
            leaf.lower.append(-math.inf)
            leaf.upper.append(math.inf)
            leaf.missing_agrees.append(True)
        slot = leaf.features.index(feature)
        threshold = attributes["nodes_values"][i]
        leaf.zero_fractions[slot] *= covers[child] / covers[i]
        if went_true:
            leaf.upper[slot] = min(leaf.upper[slot], threshold)
        else:
            leaf.lower[slot] = max(leaf.lower[slot], threshold)
        leaf.missing_agrees[slot] &= bool(missing_true[i]) == went_true
    return leaf


def _leaf_table(leaf: _Leaf) -> np.ndarray:
    """The leaf's share of each path feature's Shapley value, for every agreement pattern.

    With ``o_j`` (the row agrees with all of feature j's splits) and ``z_j`` (their zero fraction),
    the leaf contributes ``v * (o_i - z_i) * sum_k w(k) * c_k`` to feature i, where ``c_k`` is the
    coefficient of ``t**k`` in the product over the other path features of ``(z_j + o_j * t)`` and
    ``w(k) = k! (d - k - 1)! / d!``. Shaped patterns × d: ``table[pattern, i]``.
    """
    d = len(leaf.features)
    patterns = np.arange(1 << d)
    agrees = ((patterns[:, None] >> np.arange(d)) & 1).astype(np.float64)  # patterns × d
    zero = np.asarray(leaf.zero_fractions)
    weights = np.array([math.factorial(k) * math.factorial(d - k - 1) / math.factorial(d) for k in range(d)])
    table = np.empty((len(patterns), d))
    for i in range(d):
        coefficients = np.zeros((len(patterns), d))
        coefficients[:, 0] = 1.0
        for j in range(d):
            if j != i:
                shifted = np.zeros_like(coefficients)
                shifted[:, 1:] = coefficients[:, :-1] * agrees[:, j : j + 1]
                coefficients = coefficients * zero[j] + shifted
        table[:, i] = leaf.value * (agrees[:, i] - zero[i]) * (coefficients @ weights)
    return table
