"""The ONNX fraud model: loading with its feature contract, batched scoring and explanations.

A model file carries its own contract in ONNX metadata (written by ``fraudd train``): the
ordered feature names it was trained on, its version and thresholds, per-feature statistics, and
the training sample's bins that live drift is measured against (``bins.py``).
Two feature contracts exist: the daemon's ``FEATURE_NAMES`` (message and behaviour features), and
``LABEL_FEATURE_NAMES``, the same followed by the label-fed confirmed-fraud counts
(``confirmed.CONFIRMED_COLUMNS``), which ``fraudd train`` fits by default. A model whose features are
not exactly one of them is refused at load, so a mismatched file can never score silently wrong;
models of the first contract keep loading and scoring as before.

A flagged decision is explained by the exact contributions of its features (``explain.py``). A
model trained before ``fraudd train`` stored node covers cannot be explained exactly; it keeps
loading and names its reasons by the older proxy (importance × standardised distance from the
training mean), logged once at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson

from .bins import FeatureBins
from .confirmed import CONFIRMED_COLUMNS
from .explain import ExplainerError, TreeExplainer
from .features import FEATURE_NAMES, Features

log = logging.getLogger(__name__)

META_VERSION = "fraudd.version"
META_FEATURES = "fraudd.features"
META_REVIEW = "fraudd.review_threshold"
META_DECLINE = "fraudd.decline_threshold"
META_MEANS = "fraudd.feature_means"
META_SCALES = "fraudd.feature_scales"
META_IMPORTANCE = "fraudd.feature_importance"
META_METRICS = "fraudd.metrics"
META_BINS = "fraudd.feature_bins"
META_SOURCE = "fraudd.lightgbm_model"
REASONS_PER_DECISION = 2
LABEL_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + CONFIRMED_COLUMNS

# onnxruntime (1.32 on Linux) otherwise resolves and contacts Microsoft's telemetry endpoint
# (mobile.events.data.microsoft.com, seen with strace after the first session is created): no
# traffic leaves the authorization path but to Redis and PostgreSQL.
ort.disable_telemetry_events()


class ModelError(RuntimeError):
    """The model file is unusable: unreadable, or its contract does not match the daemon."""


@dataclass(frozen=True, slots=True)
class FraudModel:
    path: Path
    version: str
    feature_names: tuple[str, ...]
    review_threshold: float
    decline_threshold: float
    _session: ort.InferenceSession
    _input_name: str
    _output_name: str
    _means: np.ndarray
    _inverse_scales: np.ndarray
    _importance: np.ndarray
    _explainer: TreeExplainer | None
    _margin_output: bool  # the session returns log-odds; the logistic is applied here, in float64
    feature_bins: FeatureBins | None = None  # None: trained before bins were stored, no drift measured

    @classmethod
    def load(cls, path: Path, expected_features: tuple[str, ...]) -> FraudModel:
        """Load ``path`` and check its feature contract; raises ``ModelError`` with the reason."""
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        options = ort.SessionOptions()
        # Parallelism comes from worker processes; threads inside one would fight them for cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            proto = onnx.load(str(path))
            margin_model = _margin_model(proto)
            margin_output = margin_model is not None
            session = ort.InferenceSession(margin_model or proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnx and onnxruntime raise their own untyped errors for corrupt files
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
        meta = session.get_modelmeta().custom_metadata_map
        missing = [key for key in (META_VERSION, META_FEATURES, META_REVIEW, META_DECLINE) if key not in meta]
        if missing:
            raise ModelError(f"{path}: model metadata lacks {', '.join(missing)} (train it with `fraudd train`)")
        names = tuple(orjson.loads(meta[META_FEATURES]))
        contracts = (tuple(expected_features), tuple(expected_features) + CONFIRMED_COLUMNS)
        if names not in contracts:
            expected_features = contracts[len(names) > len(contracts[0])]
            extra = sorted(set(names) - set(expected_features))
            absent = sorted(set(expected_features) - set(names))
            raise ModelError(
                f"{path}: feature contract mismatch (model has {len(names)} features, daemon computes "
                f"{len(expected_features)}; unknown to daemon: {extra or '-'}; not in model: {absent or '-'}"
                f"{'; same names, different order' if not extra and not absent else ''})"
            )
        width = len(names)
        inputs = session.get_inputs()
        declared_width = inputs[0].shape[-1] if len(inputs) == 1 else None
        if len(inputs) != 1 or (isinstance(declared_width, int) and declared_width != width):
            raise ModelError(f"{path}: expected one input of width {width}, got {[(i.name, i.shape) for i in inputs]}")
        output_name = _probability_output(session)
        means = _vector(meta, META_MEANS, width, 0.0)
        scales = _vector(meta, META_SCALES, width, 1.0)
        importance = _vector(meta, META_IMPORTANCE, width, 1.0)
        try:
            bins = FeatureBins.loads(meta[META_BINS], width) if META_BINS in meta else None
        except ValueError as exc:
            raise ModelError(f"{path}: model metadata {META_BINS}: {exc}") from None
        try:
            explainer: TreeExplainer | None = TreeExplainer.from_onnx(proto, width)
        except ExplainerError as exc:
            explainer = None
            log.warning(
                "model cannot be explained exactly; reasons use the importance proxy",
                extra={"event": "explainer_unavailable", "model": str(path), "reason": str(exc)},
            )
        return cls(
            path=path,
            version=meta[META_VERSION],
            feature_names=names,
            review_threshold=float(meta[META_REVIEW]),
            decline_threshold=float(meta[META_DECLINE]),
            _session=session,
            _input_name=inputs[0].name,
            _output_name=output_name,
            _means=means,
            _inverse_scales=1.0 / np.where(scales > 0, scales, 1.0),
            _importance=importance,
            _explainer=explainer,
            _margin_output=margin_output,
            feature_bins=bins,
        )

    @property
    def uses_label_features(self) -> bool:
        """Whether the model takes the label-fed counts (the second feature contract)."""
        return len(self.feature_names) > len(FEATURE_NAMES)

    def inputs(self, features: Features) -> np.ndarray:
        """The batch's rows as this model takes them: the columns of its feature contract."""
        if not self.uses_label_features:
            return features.matrix
        counts = np.column_stack([features.column(name) for name in CONFIRMED_COLUMNS])
        return np.hstack([features.matrix, counts.astype(np.float32)])

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Fraud probability per row, float32, in one inference call for the whole batch."""
        if len(matrix) == 0:
            return np.zeros(0, dtype=np.float32)
        (output,) = self._session.run([self._output_name], {self._input_name: matrix})
        column = output[:, -1] if output.ndim == 2 else output
        if self._margin_output:
            column = 1.0 / (1.0 + np.exp(-column.astype(np.float64)))
        return np.ascontiguousarray(column, dtype=np.float32)

    @property
    def explainable(self) -> bool:
        """Whether ``explain`` gives exact contributions (the model carries node covers)."""
        return self._explainer is not None

    def explain(self, matrix: np.ndarray) -> tuple[list[list[str]], list[dict[str, Any] | None]]:
        """Each row's model reason codes and explanation document; meant for the flagged rows only.

        The document is ``{"base", "contributions": {feature: log-odds}, "values": {feature: value}}``
        with ``base + sum(contributions)`` the row's raw score; the reasons are the features that
        pushed the score up most, strongest first. Rounding to 6 decimals keeps that sum within 1e-4.
        """
        if len(matrix) == 0:
            return [], []
        if self._explainer is None:
            weight = np.abs(matrix - self._means) * self._inverse_scales * self._importance
            top = np.argsort(-weight, axis=1)[:, :REASONS_PER_DECISION]
            return [[f"model:{self.feature_names[j]}" for j in row] for row in top.tolist()], [None] * len(matrix)
        explanation = self._explainer.explain(matrix)
        contributions = explanation.contributions
        top = np.argsort(-contributions, axis=1)[:, :REASONS_PER_DECISION]
        pushed_up = np.take_along_axis(contributions, top, axis=1) > 0
        names = self.feature_names
        reasons = [[f"model:{names[j]}" for j, up in zip(row, ups) if up] for row, ups in zip(top.tolist(), pushed_up.tolist())]
        base = round(explanation.base, 6)
        documents: list[dict[str, Any] | None] = [
            {"base": base, "contributions": dict(zip(names, row)), "values": dict(zip(names, values))}
            for row, values in zip(np.round(contributions, 6).tolist(), matrix.tolist())
        ]
        return reasons, documents


def _margin_model(proto: onnx.ModelProto) -> bytes | None:
    """A logistic tree ensemble made to output its log-odds, for ``score`` to apply the logistic.

    onnxruntime computes a negative margin's probability as ``1 - sigmoid(|margin|)`` in float32,
    which keeps only ~6e-8 of absolute precision: a score of 1e-4 then carries a log-odds error of
    ~6e-4, and an explanation could not add up to the score it explains. In float64 both agree to
    the precision of the stored ``real``.
    """
    margins = onnx.ModelProto()
    margins.CopyFrom(proto)
    ensembles = [node for node in margins.graph.node if node.op_type == "TreeEnsembleClassifier"]
    if len(ensembles) != 1:
        return None
    for attribute in ensembles[0].attribute:
        if attribute.name == "post_transform" and attribute.s == b"LOGISTIC":
            attribute.s = b"NONE"
            serialized: bytes = margins.SerializeToString()
            return serialized
    return None


def _probability_output(session: ort.InferenceSession) -> str:
    """The output holding class probabilities (classifiers also emit a label output)."""
    outputs = session.get_outputs()
    for output in outputs:
        if output.name in ("probabilities", "output_probability"):
            return str(output.name)
    return str(outputs[-1].name)


def _vector(meta: dict[str, str], key: str, width: int, fill: float) -> np.ndarray:
    if key not in meta:
        return np.full(width, fill, dtype=np.float32)
    values = np.asarray(orjson.loads(meta[key]), dtype=np.float32)
    if values.shape != (width,):
        raise ModelError(f"model metadata {key} has {values.size} values for {width} features")
    return values
