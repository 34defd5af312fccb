"""The grading pipeline: bytes -> decode -> fundus crop -> quality gate -> model -> decision -> explanation.

Front doors (CLI, HTTP service, evaluation) call :class:`GradingPipeline`. Its stages are separate methods so
that a server can run the CPU-bound preparation of many requests in parallel and batch the model calls (the
service schedules them itself); everyone else grades many images through the one batch engine,
:meth:`GradingPipeline.grade_items` / :meth:`GradingPipeline.grade_paths`, in worker threads or, for a
long run on Linux, in worker processes (``processes=True``) that each grade whole images.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import cv2
import numpy as np

from retinagrade.constants import Status
from retinagrade.cpus import available_cpus
from retinagrade.errors import (
    ModelError,
    PreparationFailedError,
    RetinagradeError,
    UnknownEvidenceError,
    failure_summary,
)
from retinagrade.explain.heatmap import evidence_map
from retinagrade.eyes import RawOutputs
from retinagrade.inference.grader import ModelOutputs, OnnxGrader
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.inference.postprocess import GradeDecision, decide_grade
from retinagrade.preprocessing.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, read_image_file
from retinagrade.preprocessing.pipeline import PreparedImage, batch_tensor, prepare_fundus
from retinagrade.preprocessing.quality import (
    GateParams,
    QualityAssessment,
    assess_quality,
    open_detector,
    outrank_with_referable,
)
from retinagrade.referral import Recommendation, recommend

logger = logging.getLogger("retinagrade.pipeline")

DEFAULT_MODEL_FILE = "retinagrade-dr.json"
#: The evidence maps an explanation can show: the severity (regression) head's, or the macular oedema head's.
EVIDENCE_KINDS = ("severity", "dme")


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

#: Images per model call in the batch engine. Also the chunk the CLI used before the engine existed, so
#: results are bit-identical to it (ONNX Runtime's kernels may round differently at other batch sizes).
DEFAULT_BATCH_SIZE = 8

K = TypeVar("K")
#: A pending job of a batch engine: a future, or an error known before any work.
J = TypeVar("J")


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
        """Gradable, or refused by the gradability score alone (a confident referable answer may outrank that)."""
        return self.quality.is_fundus and (self.quality.gradable or self.quality.model_may_outrank)


@dataclass
class GradeResult:
    """The answer for one image.

    ``decision`` is set only when ``status == "graded"``. ``quality`` is always set for an image that
    decoded; ``quality.warning`` marks a photo graded although the gate found its quality too low. ``heatmap``
    (S x S in [0, 1]) and ``crop`` (S x S x 3 RGB) are set when an explanation was asked for and the image was
    graded. ``metadata`` is what the file said about patient and eye
    (:attr:`DecodedImage.metadata <retinagrade.preprocessing.decode.DecodedImage.metadata>`).
    """

    status: Status
    quality: QualityAssessment
    decision: GradeDecision | None
    sha256: str
    original_size: tuple[int, int]
    timings_ms: dict[str, float]
    metadata: Mapping[str, str] = field(default_factory=dict)
    heatmap: np.ndarray | None = None
    crop: np.ndarray | None = None
    #: The model's grade logits and regression output (graded images), for the fellow-eye rule.
    raw: RawOutputs | None = None

    @property
    def recommendation(self) -> Recommendation:
        """What to do next (:func:`retinagrade.referral.recommend`)."""
        return recommend(self.status, self.decision.urgency if self.decision else None)


#: One image's outcome in the batch engine: its result, or the error that kept it from being graded.
Outcome = GradeResult | RetinagradeError
#: What the engine grades: bytes, a path to read (in a worker thread), or an error found before reading.
Source = bytes | Path | RetinagradeError


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
        # The gate's own not-a-fundus detector (checked against its sha256; None for a rules-only gate).
        self.detector = open_detector(gate)
        self.max_pixels = max_pixels
        #: Which class-activation map an explanation shows: the severity (regression) map, or ``dme``.
        self.evidence = "severity"

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        operating_point: str | None = None,
    ) -> GradingPipeline:
        """Load a model spec (or the ONNX file beside it) and its gate; fail loudly if anything is off.

        ``operating_point`` names one of the spec's operating points (default: the spec's default).

        Raises:
            ModelError: the model, its spec or its gate is missing or wrong.
            UnknownOperatingPointError: the spec has no operating point of that name.
        """
        spec = ModelSpec.load(model or DEFAULT_MODEL).with_operating_point(operating_point)
        gate_path = spec.gate_path
        if gate_path is None or not gate_path.is_file():
            raise ModelError(f"quality-gate file {gate_path} named by the model spec does not exist")
        try:
            gate = GateParams.from_json(gate_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"quality-gate file {gate_path.name} is malformed: {exc!r}") from exc
        return cls(spec, gate, threads=threads, max_pixels=max_pixels)

    def with_spec(self, spec: ModelSpec) -> GradingPipeline:
        """The same loaded model and gate read with another operating point (a site profile applied).

        Shares the ONNX Runtime session; only the spec's calibration, thresholds and decision may differ.
        """
        if spec.sha256 != self.spec.sha256 or spec.preprocess != self.spec.preprocess:
            raise ModelError("a pipeline can only take a spec of the same model with the same preprocessing")
        clone = copy.copy(self)
        clone.spec = spec
        return clone

    def at_operating_point(self, name: str | None) -> GradingPipeline:
        """The same pipeline deciding referrals at another of the spec's named operating points (None: as is).

        Raises:
            UnknownOperatingPointError: the spec (or the site profile applied to it) has no such point.
        """
        if not name:
            return self
        return self.with_spec(self.spec.with_operating_point(name))

    def showing(self, evidence: str) -> GradingPipeline:
        """The same pipeline whose explanations show another head's evidence: ``severity`` or ``dme``.

        Raises:
            InputError: the model has no such head (``dme`` needs a model with a DME output).
        """
        if evidence == self.evidence:
            return self
        if evidence not in EVIDENCE_KINDS or (evidence == "dme" and "dme" not in self.spec.cam_channels):
            raise UnknownEvidenceError(
                f"No evidence map named {evidence[:16]!r} for this model (maps: "
                f"{', '.join(k for k in EVIDENCE_KINDS if k == 'severity' or k in self.spec.cam_channels)})."
            )
        clone = copy.copy(self)
        clone.evidence = evidence
        return clone

    @property
    def evidence_channel(self) -> int:
        return self.spec.severity_channel if self.evidence == "severity" else self.spec.cam_channels.index("dme")

    # -- stages -------------------------------------------------------------------------------------------
    def prepare(self, data: bytes) -> PreparedRequest:
        """Decode, locate and crop the fundus, and run the quality gate. Raises InputError for bad input."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        decoded = decode_image(data, max_pixels=self.max_pixels, min_side=self.spec.preprocess.decode_min_side)
        timings["decode"] = _ms(start)
        start = time.perf_counter()
        prepared = prepare_fundus(decoded, self.spec.preprocess)
        quality = assess_quality(decoded, prepared, self.gate, self.detector)
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
                outputs.logits[j],
                outputs.regression[j : j + 1],
                outputs.cam[j],
                outputs.embedding[j],
                None if outputs.dme is None else outputs.dme[j : j + 1],
            )
            requests[i].timings_ms["inference"] = elapsed
        return results

    def finish(self, request: PreparedRequest, outputs: ModelOutputs | None, explain: bool = False) -> GradeResult:
        """Turn model outputs (or the gate's refusal) into a :class:`GradeResult`.

        A photo the gradability score refused but the model read (:attr:`PreparedRequest.needs_model`) is graded
        with ``quality.warning`` when its P(referable) outranks the refusal, and stays ungradable otherwise.
        """
        quality = request.quality
        size = request.decoded.original_size
        metadata = request.decoded.metadata
        dme_logit = None if outputs is None or outputs.dme is None else float(outputs.dme[0])
        decision = (
            None
            if outputs is None
            else decide_grade(outputs.logits, float(outputs.regression[0]), self.spec, dme_logit)
        )
        if decision is not None and not quality.gradable:
            quality = outrank_with_referable(quality, decision.p_referable, self.gate)
        if outputs is None or decision is None or not quality.gradable:
            status: Status = "not_fundus" if not quality.is_fundus else "ungradable"
            return GradeResult(status, quality, None, request.sha256, size, request.timings_ms, metadata)
        result = GradeResult("graded", quality, decision, request.sha256, size, request.timings_ms, metadata)
        result.raw = (np.array(outputs.logits, dtype=np.float64), float(outputs.regression[0]))
        if explain:
            s = self.spec.preprocess.input_size
            result.heatmap = evidence_map(outputs.cam, s, self.evidence_channel, request.prepared.crop.mask)
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

    def grade_batch(self, items: list[bytes], explain: bool = False) -> list[GradeResult | RetinagradeError]:
        """Grade several images; a bad image yields its error, the others their results."""
        return [outcome for _, outcome in self.grade_items(enumerate(items), workers=1, explain=explain)]

    # -- the batch engine -------------------------------------------------------------------------------
    def grade_paths(
        self, paths: Iterable[Path], *, workers: int | None = None, explain: bool = False, processes: bool = False
    ) -> Generator[tuple[Path, Outcome], None, None]:
        """Grade image files, in order; a file that cannot be read yields its error (a code, never a crash).

        Files are read in the workers (:func:`~retinagrade.preprocessing.decode.read_image_file`, which never
        blocks on a FIFO), so slow storage overlaps with the model too. ``processes``: see :meth:`grade_items`.
        """
        return self._run(((path, path) for path in paths), workers=workers, explain=explain, processes=processes)

    def grade_items(
        self,
        items: Iterable[tuple[K, Source]],
        *,
        workers: int | None = None,
        explain: bool = False,
        processes: bool = False,
    ) -> Generator[tuple[K, Outcome], None, None]:
        """Grade encoded images (or files) tagged with any key, in order; an error passed in comes out unchanged.

        With ``processes`` (and more than one worker, on Linux) each worker is a process forked from this one,
        with this pipeline already loaded, that grades whole images: no lock between the workers' Python code,
        and each keeps its core busy the whole time, where threads queue on the interpreter lock and on one
        model call. The answers are the same (the model's outputs for an image do not depend on the other
        images of its batch: ``tests/model/test_pipeline_real.py``). Worth it for a run of many images: forking
        costs a few milliseconds per worker.
        """
        return self._run(items, workers=workers, explain=explain, processes=processes)

    def _prepare_source(self, source: Source) -> PreparedRequest | RetinagradeError:
        if isinstance(source, RetinagradeError):
            return source
        try:
            return self.prepare(read_image_file(source) if isinstance(source, Path) else source)
        except RetinagradeError as exc:
            return exc
        except Exception as exc:
            # One file that trips a failure no input check foresaw must not end a run of thousands: it gets an
            # error row, as in the cluster engine. Type and place only: the message may quote the file.
            logger.error("preparing an image failed unexpectedly: %s", failure_summary(exc))
            return PreparationFailedError("Preparing this image failed unexpectedly; the log says where.")

    def _run(
        self,
        items: Iterable[tuple[K, Source]],
        *,
        workers: int | None,
        explain: bool,
        processes: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Generator[tuple[K, Outcome], None, None]:
        workers = max(1, workers if workers is not None else min(4, available_cpus()))
        if processes and workers > 1 and sys.platform == "linux":
            return self._run_in_processes(items, workers=workers, explain=explain)
        return self._run_in_threads(items, workers=workers, explain=explain, batch_size=batch_size)

    def _run_in_threads(
        self, items: Iterable[tuple[K, Source]], *, workers: int, explain: bool, batch_size: int
    ) -> Generator[tuple[K, Outcome], None, None]:
        """Prepare in threads, run the model in batches, yield in input order.

        At most two batches are in flight (one at the model, the next being prepared), so memory stays
        bounded however many images come in, and each result is yielded as soon as its batch is done, so a
        caller that writes as it goes loses nothing when the run stops.
        """
        window = max(2 * batch_size, workers)
        pending: deque[tuple[K, Future[PreparedRequest | RetinagradeError]]] = deque()
        source = iter(items)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retinagrade-grade")
        try:

            def submit(data: Source) -> Future[PreparedRequest | RetinagradeError]:
                return pool.submit(self._prepare_source, data)

            _top_up(pending, source, window, submit)
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                _top_up(pending, source, window, submit)
                prepared = [future.result() for _, future in batch]
                good = [p for p in prepared if isinstance(p, PreparedRequest)]
                outputs = iter(self.infer(good))
                for (key, _), item in zip(batch, prepared, strict=True):
                    if isinstance(item, RetinagradeError):
                        yield key, item
                    else:
                        yield key, self.finish(item, next(outputs), explain=explain)
        finally:
            # A caller that stops early (Ctrl-C, a closed generator) must not wait for the whole window.
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_in_processes(
        self, items: Iterable[tuple[K, Source]], *, workers: int, explain: bool
    ) -> Generator[tuple[K, Outcome], None, None]:
        """Grade whole images in forked worker processes, a few per worker in flight, yielding in input order."""
        # Imported here: multiprocessing costs every other use of the pipeline (the service) its start-up time.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        window = 4 * workers
        pending: deque[tuple[K, Future[Outcome] | RetinagradeError]] = deque()
        source = iter(items)
        # Forked, not spawned: the workers start with this pipeline loaded (its model checked and its sessions
        # made once, here), so a worker costs milliseconds, not a second of imports and loading.
        context = multiprocessing.get_context("fork")
        # One process per core: OpenCV's own thread pool in each worker would only make them fight over the
        # cores. Set here, before the fork: a forked child that reconfigures the pool it inherited (whose
        # threads stayed in the parent) can wait forever for them. This process gets its own back at the end.
        opencv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(self,))
        try:

            def submit(data: Source) -> Future[Outcome] | RetinagradeError:
                # An error known before reading needs no worker.
                return data if isinstance(data, RetinagradeError) else pool.submit(_grade_in_worker, data, explain)

            _top_up(pending, source, window, submit)
            while pending:
                key, job = pending.popleft()
                _top_up(pending, source, window, submit)
                yield key, job if isinstance(job, RetinagradeError) else _restored(job.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            cv2.setNumThreads(opencv_threads)


def _top_up(
    pending: deque[tuple[K, J]], source: Iterator[tuple[K, Source]], window: int, submit: Callable[[Source], J]
) -> None:
    """Submit the next items of ``source`` until ``window`` jobs are pending (fewer when it runs out)."""
    while len(pending) < window:
        item = next(source, None)
        if item is None:
            return
        pending.append((item[0], submit(item[1])))


# -- worker processes of the batch engine ------------------------------------------------------------------

#: The pipeline of this worker process (set when the worker starts; None in every other process).
_WORKER: GradingPipeline | None = None
#: Sessions a worker inherited but cannot use; never released (see :func:`_start_worker`).
_INHERITED: list[Any] = []


def _start_worker(pipeline: GradingPipeline) -> None:
    """Set up a forked worker of :meth:`GradingPipeline.grade_items` (``processes=True``)."""
    global _WORKER
    # Ctrl-C in a terminal reaches the whole process group; the parent stops the run and its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pipeline.grader.threads > 1:
        # A session with intra-op threads lost them in the fork; this worker makes its own. The inherited one
        # is kept: releasing it would join threads that do not exist in this process.
        _INHERITED.append(pipeline.grader)
        pipeline = copy.copy(pipeline)
        pipeline.grader = OnnxGrader(pipeline.spec, threads=pipeline.grader.threads)
    _WORKER = pipeline


def _grade_in_worker(source: bytes | Path, explain: bool) -> Outcome:
    """One image graded in a worker process, made picklable for the way back."""
    pipeline = _WORKER
    assert pipeline is not None, "called outside a worker started by _start_worker"
    prepared = pipeline._prepare_source(source)
    if isinstance(prepared, RetinagradeError):
        outcome: Outcome = prepared
    else:
        outcome = pipeline.finish(prepared, pipeline.infer([prepared])[0], explain=explain)
    return _portable(outcome)


def _portable(outcome: Outcome) -> Outcome:
    """The outcome with its read-only metadata mapping (which pickle refuses) as a plain dict."""
    if isinstance(outcome, GradeResult):
        return dataclasses.replace(outcome, metadata=dict(outcome.metadata))
    if "metadata" in vars(outcome):
        outcome.metadata = dict(outcome.metadata)
    return outcome


def _restored(outcome: Outcome) -> Outcome:
    """The outcome as the worker had it: its metadata read-only again."""
    if isinstance(outcome, GradeResult):
        return dataclasses.replace(outcome, metadata=MappingProxyType(dict(outcome.metadata)))
    if "metadata" in vars(outcome):
        outcome.metadata = MappingProxyType(dict(outcome.metadata))
    return outcome
