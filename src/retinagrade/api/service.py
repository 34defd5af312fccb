"""The grading service: the pipeline's stages scheduled for a server.

Decoding and preprocessing run on a thread pool, the model on the batcher's thread, audit writes on their own
thread; the event loop only hands work around. Routes call :class:`GradingService` and never the pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime

import numpy as np

from retinagrade.api.audit import AuditRecord, AuditStore
from retinagrade.api.batching import Admission, DynamicBatcher
from retinagrade.api.metrics import ServiceMetrics
from retinagrade.api.schemas import Explanation, GradeResponse, ImageInfo, ModelRef, Quality, Timings
from retinagrade.api.settings import Settings
from retinagrade.constants import NUM_GRADES
from retinagrade.errors import InputError, ModelError
from retinagrade.explain.heatmap import encode_png, overlay
from retinagrade.pipeline import GradeResult, GradingPipeline, PreparedRequest

logger = logging.getLogger("retinagrade.api.service")

EXPLANATION_METHOD = "cam-severity"
"""Class-activation map of the severity (regression) head, overlaid on the cropped fundus."""


def warm_up(pipeline: GradingPipeline, batch_sizes: tuple[int, ...]) -> float:
    """Run the model once per batch size and check its outputs; returns the milliseconds it took.

    Raises:
        ModelError: the model answered with the wrong shape or with non-finite numbers.
    """
    start = time.perf_counter()
    size = pipeline.spec.preprocess.input_size
    for n in sorted(set(batch_sizes)):
        outputs = pipeline.grader.run(np.zeros((n, 3, size, size), np.float32))
        if outputs.logits.shape != (n, NUM_GRADES) or not np.isfinite(outputs.logits).all():
            raise ModelError(
                f"warm-up inference on a batch of {n} gave logits of shape {outputs.logits.shape} or non-finite values"
            )
    return round((time.perf_counter() - start) * 1000.0, 1)


def render_explanation(result: GradeResult, opacity: float) -> bytes:
    """The heatmap over the cropped fundus, as PNG bytes."""
    assert result.heatmap is not None and result.crop is not None
    return encode_png(overlay(result.crop, result.heatmap, opacity))


class GradingService:
    """The loaded pipeline with its thread pools, batcher, admission control, metrics and audit trail."""

    def __init__(
        self, pipeline: GradingPipeline, settings: Settings, metrics: ServiceMetrics, audit: AuditStore | None
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        spec = pipeline.spec
        self.model_ref = ModelRef(name=spec.name, version=spec.version, sha256=spec.sha256)
        self.admission = Admission(settings.max_queue, settings.retry_after_s, metrics)
        self.batcher = DynamicBatcher(
            pipeline.infer,
            max_batch_size=settings.max_batch_size if settings.batching else 1,
            max_wait_s=settings.max_batch_wait_ms / 1000.0,
            metrics=metrics,
        )
        self._prepare_pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="retinagrade-prepare")
        self._audit_pool = ThreadPoolExecutor(1, thread_name_prefix="retinagrade-audit")

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._prepare_pool.shutdown(wait=True)
        self._audit_pool.shutdown(wait=True)

    def admit(self, images: int) -> AbstractContextManager[None]:
        """Reserve room for ``images``; raises OverloadedError (503) when the service is full."""
        return self.admission.admit(images)

    # -- stages ---------------------------------------------------------------------------------------------
    async def _prepare(self, data: bytes) -> PreparedRequest:
        loop = asyncio.get_running_loop()
        self.batcher.preparing += 1
        try:
            return await loop.run_in_executor(self._prepare_pool, self.pipeline.prepare, data)
        finally:
            self.batcher.preparing -= 1

    async def _prepare_or_error(self, data: bytes) -> PreparedRequest | InputError:
        try:
            return await self._prepare(data)
        except InputError as exc:
            self.metrics.input_errors.labels(exc.code).inc()
            return exc

    async def _respond(
        self, request: PreparedRequest, outputs: object, request_id: str, started: float, explain: bool
    ) -> tuple[GradeResult, GradeResponse, bytes | None]:
        result = self.pipeline.finish(request, outputs, explain=explain)  # type: ignore[arg-type]
        png = None
        if result.heatmap is not None:
            loop = asyncio.get_running_loop()
            png = await loop.run_in_executor(
                self._prepare_pool, render_explanation, result, self.settings.heatmap_opacity
            )
        result.timings_ms["total"] = round((time.perf_counter() - started) * 1000.0, 2)
        self.metrics.observe_result(result.status, result.decision.grade if result.decision else None)
        return result, self.to_response(result, request_id, png), png

    async def _record(self, pairs: list[tuple[GradeResult, GradeResponse]]) -> None:
        if self.audit is None or not pairs:
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        records = [
            AuditRecord(
                time=now,
                request_id=response.request_id,
                image_sha256=result.sha256,
                model_name=self.model_ref.name,
                model_version=self.model_ref.version,
                model_sha256=self.model_ref.sha256,
                status=result.status,
                grade=response.grade,
                referable=response.referable,
                result=response.model_dump(mode="json", exclude={"explanation", "timings_ms"}),
            )
            for result, response in pairs
        ]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._audit_pool, self.audit.append, records)

    # -- front-door operations -------------------------------------------------------------------------------
    async def grade(
        self, data: bytes, *, request_id: str, started: float, explain: bool = False
    ) -> tuple[GradeResponse, bytes | None]:
        """Grade one image; returns the response and, when explained, the overlay PNG.

        Raises:
            InputError: the bytes are not a readable image of an accepted kind and size.
        """
        try:
            request = await self._prepare(data)
        except InputError as exc:
            self.metrics.input_errors.labels(exc.code).inc()
            raise
        (outputs,) = await self.batcher.infer([request])
        result, response, png = await self._respond(request, outputs, request_id, started, explain)
        await self._record([(result, response)])
        return response, png

    async def grade_many(
        self, images: list[bytes | InputError], *, request_id: str, started: float, explain: bool = False
    ) -> list[GradeResponse | InputError]:
        """Grade several images; an unreadable one yields its error and never fails the others."""
        prepared = await asyncio.gather(
            *(self._prepare_or_error(item) if isinstance(item, bytes) else _done(item) for item in images)
        )
        good = [p for p in prepared if isinstance(p, PreparedRequest)]
        outputs = iter(await self.batcher.infer(good))
        answers: list[GradeResponse | InputError] = []
        pairs: list[tuple[GradeResult, GradeResponse]] = []
        for index, item in enumerate(prepared):
            if isinstance(item, InputError):
                answers.append(item)
                continue
            result, response, _ = await self._respond(item, next(outputs), f"{request_id}.{index}", started, explain)
            pairs.append((result, response))
            answers.append(response)
        await self._record(pairs)
        return answers

    def to_response(self, result: GradeResult, request_id: str, png: bytes | None) -> GradeResponse:
        timings = result.timings_ms
        quality = result.quality
        decision = result.decision
        explanation = None
        if png is not None and result.heatmap is not None and result.crop is not None:
            height, width = result.heatmap.shape[:2]
            explanation = Explanation(
                method=EXPLANATION_METHOD,
                width=width,
                height=height,
                heatmap_png_base64=base64.b64encode(png).decode("ascii"),
                fundus_png_base64=base64.b64encode(encode_png(result.crop)).decode("ascii"),
            )
        status = result.status
        if status == "error":  # pragma: no cover - the pipeline reports errors by raising
            raise ModelError("the pipeline returned an error result")
        return GradeResponse(
            request_id=request_id,
            status=status,
            grade=decision.grade if decision else None,
            grade_name=decision.grade_name if decision else None,
            referable=decision.referable if decision else None,
            probabilities=list(decision.probabilities) if decision else None,
            p_referable=decision.p_referable if decision else None,
            confidence=decision.confidence if decision else None,
            quality=Quality(
                score=quality.score,
                is_fundus=quality.is_fundus,
                gradable=quality.gradable,
                reasons=list(quality.reasons),
            ),
            model=self.model_ref,
            image=ImageInfo(sha256=result.sha256, width=result.original_size[0], height=result.original_size[1]),
            timings_ms=Timings(
                decode=timings.get("decode", 0.0),
                preprocess=timings.get("preprocess", 0.0),
                queue=timings.get("queue"),
                inference=timings.get("inference"),
                total=timings.get("total", 0.0),
            ),
            explanation=explanation,
        )


async def _done(error: InputError) -> InputError:
    return error
