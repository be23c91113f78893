"""A thresholds file: the review and decline scores a team chose for one model.

``fraudd calibrate`` writes it from the team's own traffic; ``fraudd run --thresholds`` reads it
(and re-reads it on SIGHUP). It names the model version it was calibrated for, because a score
threshold means nothing for another model: loading it next to a different model is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson


class ThresholdsError(ValueError):
    """The thresholds file is unusable; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    review_threshold: float
    decline_threshold: float
    model_version: str
    # How they were chosen (targets, period, rates expected from the stored traffic): for people.
    calibration: dict[str, Any] = field(default_factory=dict)

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2) + b"\n"

    def check_model(self, model_version: str, path: Path | str) -> None:
        if model_version != self.model_version:
            raise ThresholdsError(
                f"{path}: calibrated for model {self.model_version}, not for {model_version}; "
                f"run `fraudd calibrate` for this model"
            )


def load(path: Path | str) -> Thresholds:
    """Read and validate a thresholds file; raises ThresholdsError naming the file."""
    try:
        document = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ThresholdsError(f"{path}: cannot read thresholds file: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ThresholdsError(f"{path}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ThresholdsError(f"{path}: must be a JSON object")
    review, decline = (_threshold(path, document, name) for name in ("review_threshold", "decline_threshold"))
    version = document.get("model_version")
    if decline < review:
        raise ThresholdsError(f"{path}: decline_threshold {decline} is below review_threshold {review}")
    if not isinstance(version, str) or not version:
        raise ThresholdsError(f"{path}: 'model_version' must name the model the thresholds were calibrated for")
    calibration = document.get("calibration", {})
    return Thresholds(review, decline, version, calibration if isinstance(calibration, dict) else {})


def _threshold(path: Path | str, document: dict[str, Any], name: str) -> float:
    value = document.get(name)
    if value.__class__ not in (int, float) or not 0.0 <= value <= 1.0:
        raise ThresholdsError(f"{path}: '{name}' must be a number between 0 and 1, got {value!r}")
    return float(value)
