"""The grading pipeline: bytes -> decode -> fundus crop -> quality gate -> model -> decision -> explanation.

Front doors (CLI, HTTP service, evaluation) call :class:`GradingPipeline`. Its stages are separate methods so
that a server can run the CPU-bound preparation of many requests in parallel and batch the model calls.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from retinagrade.constants import Status
from retinagrade.errors import ModelError
from retinagrade.explain.heatmap import evidence_map
from retinagrade.inference.grader import ModelOutputs, OnnxGrader
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.inference.postprocess import GradeDecision, decide_grade
from retinagrade.preprocessing.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image
from retinagrade.preprocessing.pipeline import PreparedImage, batch_tensor, prepare
from retinagrade.preprocessing.quality import GateParams, QualityAssessment, assess_quality

DEFAULT_MODEL_FILE = "retinagrade-dr.json"


def shipped_model_dir() -> Path:
    """The folder of the shipped model, spec, gate and card.

    An installed package carries them as the package data of ``retinagrade.models`` (pyproject.toml maps
    that package onto the repository's ``models/``); a source checkout (editable install, ``PYTHONPATH=src``)
    reads the repository's ``models/`` itself.
    """
    packaged = resources.files("retinagrade") / "models"
    if (packaged / DEFAULT_MODEL_FILE).is_file():
        # An installed wheel is a folder on disk (ONNX Runtime needs a real file): str() is its path.
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "models"


#: The model shipped with the package, used when no other model is named.
DEFAULT_MODEL = shipped_model_dir() / DEFAULT_MODEL_FILE

UNFAMILIAR_REASON = "unfamiliar_image"


@dataclass
class PreparedRequest:
    """One decoded and preprocessed image, waiting for (or excused from) the model."""

    decoded: DecodedImage
    prepared: PreparedImage
    quality: QualityAssessment
    sha256: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def needs_model(self) -> bool:
        return self.quality.is_fundus and self.quality.gradable


@dataclass
class GradeResult:
    """The answer for one image.

    ``grade``/``decision`` are set only when ``status == "graded"``. ``quality`` is always set for an image
    that decoded. ``heatmap`` (S x S in [0, 1]) and ``crop`` (S x S x 3 RGB) are set when an explanation was
    asked for and the image was graded.
    """

    status: Status
    quality: QualityAssessment
    decision: GradeDecision | None
    sha256: str
    original_size: tuple[int, int]
    timings_ms: dict[str, float]
    ood_distance: float | None = None
    heatmap: np.ndarray | None = None
    crop: np.ndarray | None = None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class GradingPipeline:
    """The model, its spec and the quality gate, loaded once."""

    def __init__(
        self, spec: ModelSpec, gate: GateParams, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.spec = spec
        self.gate = gate
        self.grader = OnnxGrader(spec, threads=threads)
        self.max_pixels = max_pixels
        ood = spec.ood
        self._ood_mean = np.asarray(ood.get("embedding_mean", []), np.float32)
        self._ood_std = np.asarray(ood.get("embedding_std", []), np.float32)
        self._ood_limit = float(ood["distance_limit"]) if "distance_limit" in ood else None

    @classmethod
    def load(
        cls, model: str | Path | None = None, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> GradingPipeline:
        """Load a model spec (or the ONNX file beside it) and its gate; fail loudly if anything is off."""
        spec = ModelSpec.load(model or DEFAULT_MODEL)
        gate_path = spec.gate_path
        if gate_path is None or not gate_path.is_file():
            raise ModelError(f"quality-gate file {gate_path} named by the model spec does not exist")
        try:
            gate = GateParams.from_json(gate_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"quality-gate file {gate_path.name} is malformed: {exc!r}") from exc
        return cls(spec, gate, threads=threads, max_pixels=max_pixels)

    # -- stages -------------------------------------------------------------------------------------------
    def prepare(self, data: bytes) -> PreparedRequest:
        """Decode, locate and crop the fundus, and run the quality gate. Raises InputError for bad input."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        decoded = decode_image(data, max_pixels=self.max_pixels, min_side=self.spec.preprocess.decode_min_side)
        timings["decode"] = _ms(start)
        start = time.perf_counter()
        prepared = prepare(decoded, self.spec.preprocess)
        quality = assess_quality(decoded, prepared, self.gate)
        timings["preprocess"] = _ms(start)
        return PreparedRequest(decoded, prepared, quality, digest, timings)

    def infer(self, requests: list[PreparedRequest]) -> list[ModelOutputs | None]:
        """Run the model once for all requests that need it; ``None`` for the others."""
        todo = [i for i, r in enumerate(requests) if r.needs_model]
        results: list[ModelOutputs | None] = [None] * len(requests)
        if not todo:
            return results
        start = time.perf_counter()
        batch = batch_tensor([requests[i].prepared.model_image for i in todo], self.spec.preprocess)
        outputs = self.grader.run(batch)
        elapsed = _ms(start)
        for j, i in enumerate(todo):
            results[i] = ModelOutputs(
                outputs.logits[j], outputs.regression[j : j + 1], outputs.cam[j], outputs.embedding[j]
            )
            requests[i].timings_ms["inference"] = elapsed
        return results

    def ood_distance(self, embedding: np.ndarray) -> float | None:
        if self._ood_mean.size == 0:
            return None
        return float(np.sqrt(np.mean(((embedding - self._ood_mean) / self._ood_std) ** 2)))

    def finish(self, request: PreparedRequest, outputs: ModelOutputs | None, explain: bool = False) -> GradeResult:
        """Turn model outputs (or the gate's refusal) into a :class:`GradeResult`."""
        quality = request.quality
        size = request.decoded.original_size
        if outputs is None:
            status: Status = "not_fundus" if not quality.is_fundus else "ungradable"
            return GradeResult(status, quality, None, request.sha256, size, request.timings_ms)
        distance = self.ood_distance(outputs.embedding)
        if distance is not None and self._ood_limit is not None and distance > self._ood_limit:
            refused = QualityAssessment(
                is_fundus=False, gradable=False, score=quality.score, reasons=("not_fundus", UNFAMILIAR_REASON)
            )
            return GradeResult("not_fundus", refused, None, request.sha256, size, request.timings_ms, distance)
        decision = decide_grade(outputs.logits, float(outputs.regression[0]), self.spec)
        result = GradeResult("graded", quality, decision, request.sha256, size, request.timings_ms, distance)
        if explain:
            s = self.spec.preprocess.input_size
            result.heatmap = evidence_map(outputs.cam, s, request.prepared.crop.mask)
            result.crop = request.prepared.crop.image
        return result

    # -- convenience ------------------------------------------------------------------------------------
    def grade(self, data: bytes, explain: bool = False) -> GradeResult:
        """Grade one encoded image. Raises :class:`~retinagrade.errors.InputError` for bad input."""
        start = time.perf_counter()
        request = self.prepare(data)
        result = self.finish(request, self.infer([request])[0], explain=explain)
        result.timings_ms["total"] = _ms(start)
        return result

    def grade_batch(self, items: list[bytes], explain: bool = False) -> list[GradeResult | Exception]:
        """Grade several images with one model call; a bad image yields its error, the others their results."""
        from retinagrade.errors import InputError

        prepared: list[PreparedRequest | Exception] = []
        for data in items:
            try:
                prepared.append(self.prepare(data))
            except InputError as exc:
                prepared.append(exc)
        good = [p for p in prepared if isinstance(p, PreparedRequest)]
        outputs = iter(self.infer(good))
        return [p if isinstance(p, Exception) else self.finish(p, next(outputs), explain) for p in prepared]
