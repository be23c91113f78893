"""The ONNX fraud model: loading with its feature contract, batched scoring and reason codes.

A model file carries its own contract in ONNX metadata (written by ``fraudd train``): the
ordered feature names it was trained on, its version and thresholds, and per-feature statistics
used to explain a decision. A model whose features are not exactly the daemon's
``FEATURE_NAMES`` is refused at load, so a mismatched file can never score silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

META_VERSION = "fraudd.version"
META_FEATURES = "fraudd.features"
META_REVIEW = "fraudd.review_threshold"
META_DECLINE = "fraudd.decline_threshold"
META_MEANS = "fraudd.feature_means"
META_SCALES = "fraudd.feature_scales"
META_IMPORTANCE = "fraudd.feature_importance"
META_METRICS = "fraudd.metrics"
REASONS_PER_DECISION = 2

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
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise ModelError(f"{path}: not a loadable ONNX model ({exc})") from exc
        meta = session.get_modelmeta().custom_metadata_map
        missing = [key for key in (META_VERSION, META_FEATURES, META_REVIEW, META_DECLINE) if key not in meta]
        if missing:
            raise ModelError(f"{path}: model metadata lacks {', '.join(missing)} (train it with `fraudd train`)")
        names = tuple(orjson.loads(meta[META_FEATURES]))
        if names != tuple(expected_features):
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
        )

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Fraud probability per row, float32, in one inference call for the whole batch."""
        if len(matrix) == 0:
            return np.zeros(0, dtype=np.float32)
        (probabilities,) = self._session.run([self._output_name], {self._input_name: matrix})
        return np.ascontiguousarray(probabilities[:, -1] if probabilities.ndim == 2 else probabilities, dtype=np.float32)

    def reasons(self, matrix: np.ndarray) -> list[list[str]]:
        """The features that pushed each row's score most, as ``model:<feature>`` reason codes.

        The contribution proxy is importance × standardised distance from the training mean: cheap
        enough to run on every flagged row of a batch, and it names what an analyst should look at.
        """
        if len(matrix) == 0:
            return []
        weight = np.abs(matrix - self._means) * self._inverse_scales * self._importance
        top = np.argsort(-weight, axis=1)[:, :REASONS_PER_DECISION]
        names = self.feature_names
        return [[f"model:{names[j]}" for j in row] for row in top.tolist()]


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
