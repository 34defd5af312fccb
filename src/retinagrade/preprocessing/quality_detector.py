"""The learned "is this a colour fundus photograph?" detector of the gate.

A frozen, ImageNet-pretrained EfficientNet-Lite0 (its own ONNX file, never the grading model, so retraining the
grader cannot move the gate) turns a small letterboxed thumbnail of the WHOLE decoded image into pooled
features of several stages; a logistic regression on those features, with its numbers in ``gate.json``, gives
P(fundus photo). Whole image, not the fundus crop: a face or a petri dish on black is only recognisable as
what it is when the network sees all of it, and the crop step assumes a fundus is there.

Serving needs onnxruntime and numpy only; the head is a dot product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

#: The backbone's input normalisation (timm ``tf_efficientnet_lite*``: mean 0.5, std 0.5 on a 0-1 scale).
_MEAN: Final[float] = 127.5
_STD: Final[float] = 127.5


def detector_thumbnail(rgb: np.ndarray, side: int, shrunk: np.ndarray | None = None) -> np.ndarray:
    """The whole image letterboxed on black into ``side`` x ``side`` (uint8 RGB), aspect ratio kept.

    Black padding, because a camera's surround is black: padding adds nothing a fundus photo lacks, so a
    wide or tall non-fundus image does not gain a cue the network could mistake for a camera's field stop.
    ``shrunk`` is ``rgb`` already area-averaged to a longer side of ``side``
    (:func:`~retinagrade.preprocessing.quality_features.overview`), which the quality features also use; it
    is taken only where this function would have made exactly that array.
    """
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if shrunk is not None and scale < 1.0 and shrunk.shape[:2] == (nh, nw):
        small = shrunk
    else:
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        small = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=interp)
    out = np.zeros((side, side, 3), np.uint8)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = small
    return out


def detector_batch(thumbnails: Sequence[np.ndarray]) -> np.ndarray:
    """N x 3 x S x S float32 input of the detector backbone from uint8 thumbnails."""
    batch = np.stack(thumbnails).astype(np.float32)
    return np.ascontiguousarray(((batch - _MEAN) / _STD).transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class DetectorParams:
    """The detector as ``gate.json`` names it.

    Attributes:
        file: the backbone's ONNX file, relative to ``gate.json``.
        sha256: checksum of that file; a mismatch refuses to load (the head was fitted on its features).
        input_side: thumbnail side in pixels.
        mean, scale: standardisation of the backbone features.
        coef, intercept: logistic regression for P(fundus photo).
        threshold: the image is "not a fundus" when P(fundus photo) is below this.
    """

    file: str
    sha256: str
    input_side: int
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.scale) == len(self.coef)) or not self.coef:
            raise ValueError("DetectorParams: mean, scale and coef must have the same, non-zero length.")
        if not all(math.isfinite(v) and v > 0 for v in self.scale):
            raise ValueError("DetectorParams: scale must be positive.")
        if not 0.0 < self.threshold < 1.0 or self.input_side < 32:
            raise ValueError("DetectorParams: threshold must lie in (0, 1) and input_side be >= 32.")

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(fundus photo) for N x D backbone features."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = np.clip(z @ np.asarray(self.coef) + self.intercept, -60.0, 60.0)
        return np.asarray(1.0 / (1.0 + np.exp(-logit)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "input_side": self.input_side,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorParams:
        return cls(
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            input_side=int(data["input_side"]),
            mean=tuple(float(v) for v in data["mean"]),
            scale=tuple(float(v) for v in data["scale"]),
            coef=tuple(float(v) for v in data["coef"]),
            intercept=float(data["intercept"]),
            threshold=float(data["threshold"]),
        )


class DetectorBackbone:
    """The frozen feature extractor (ONNX Runtime, one thread: it runs beside the grader's own threads)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def features(self, thumbnails: Sequence[np.ndarray]) -> np.ndarray:
        """N x D pooled features of uint8 thumbnails."""
        out = self.session.run(None, {self.input_name: detector_batch(thumbnails)})
        return np.asarray(out[0], np.float32)


class FundusDetector:
    """Backbone + head: P(the image is a colour fundus photograph)."""

    def __init__(self, params: DetectorParams, backbone: DetectorBackbone) -> None:
        self.params = params
        self.backbone = backbone

    def probability(self, rgb: np.ndarray, shrunk: np.ndarray | None = None) -> float:
        """P(colour fundus photo) of ``rgb``; ``shrunk`` as :func:`detector_thumbnail` takes it."""
        thumb = detector_thumbnail(rgb, self.params.input_side, shrunk)
        return float(self.params.probability(self.backbone.features([thumb]))[0])
