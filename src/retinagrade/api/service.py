"""The grading service: the pipeline's stages scheduled for a server.

Decoding and preprocessing run on a thread pool, the model on the batcher's thread, audit writes on their own
thread; the event loop only hands work around. Routes call :class:`GradingService` and never the pipeline.

Memory is bounded at each stage: request bodies by a byte budget (:mod:`retinagrade.api.intake`), images in
the queue by admission control, and decodes by their cost in decoded pixels (a small PNG can claim a large
canvas): one image over ``max_decoded_bytes`` is refused with 413, and decodes in progress together stay
under ``decode_budget_bytes`` (the others wait their turn).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import numpy as np

from retinagrade.api.audit import AuditRecord, AuditStore, AuditStoreError
from retinagrade.api.batching import Admission, DynamicBatcher
from retinagrade.api.errors import AuditUnavailableError
from retinagrade.api.intake import BodyIntake, BodyPace, ByteBudget
from retinagrade.api.schemas import Explanation, GradeResponse, ImageInfo, ModelRef, Quality, ResultStatus, Timings
from retinagrade.api.settings import Settings
from retinagrade.api.sites import Site, SiteRegistry
from retinagrade.api.telemetry import ServiceMetrics
from retinagrade.constants import NUM_GRADES
from retinagrade.errors import (
    ImageTooLargeError,
    InputError,
    ModelError,
    PreparationFailedError,
    RetinagradeError,
    failure_summary,
)
from retinagrade.explain.heatmap import encode_png, overlay
from retinagrade.monitoring.drift import Observation
from retinagrade.pipeline import GradeResult, GradingPipeline, PreparedRequest
from retinagrade.preprocessing.decode import decoded_bytes
from retinagrade.report import ResultRecord, to_record

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


#: One image's answer in a batch: its pipeline result and response, or why it was not graded.
BatchAnswer = tuple[GradeResult, GradeResponse] | RetinagradeError
Rendered = TypeVar("Rendered")

_MIB = 1024 * 1024
_AUDIT_FAILED = "The result could not be written to the audit trail, so it is not returned; retry shortly."


class DecodeBudget:
    """Memory charged to the decodes in progress; a decode that does not fit waits. Event-loop thread only."""

    def __init__(self, limit: int, metrics: ServiceMetrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.held = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.limit)  # callers refuse larger ones first; never wait forever
        async with self._changed:
            await self._changed.wait_for(lambda: self.held + size <= self.limit)
            self.held += size
        self.metrics.decoding_bytes.set(self.held)
        try:
            yield
        finally:
            async with self._changed:
                self.held -= size
                self._changed.notify_all()
            self.metrics.decoding_bytes.set(self.held)


class GradingService:
    """The loaded pipeline with its thread pools, batcher, admission control, metrics and audit trail."""

    def __init__(
        self,
        pipeline: GradingPipeline,
        settings: Settings,
        metrics: ServiceMetrics,
        audit: AuditStore | None,
        sites: SiteRegistry | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sites = sites or SiteRegistry.load(pipeline, [])
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        spec = pipeline.spec
        self.model_ref = ModelRef(name=spec.name, version=spec.version, sha256=spec.sha256)
        self.admission = Admission(settings.max_queue, settings.retry_after_s, metrics)
        self.intake = BodyIntake(
            ByteBudget(settings.buffer_budget_bytes, metrics),
            self.admission,
            BodyPace(settings.body_timeout_s, settings.body_min_bytes_per_s, settings.body_grace_s),
            settings.retry_after_s,
        )
        self.decode_budget = DecodeBudget(settings.decode_budget_bytes, metrics)
        self._audit_checked_at = float("-inf")
        self._audit_error: str | None = None
        self._audit_probe = asyncio.Lock()
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

    # -- the audit store's health ---------------------------------------------------------------------------
    def _audit_failed(self, reason: str) -> None:
        self.metrics.audit_failures.inc()
        self._audit_error = reason
        self._audit_checked_at = time.monotonic()

    async def check_audit(self) -> None:
        """Raise if the audit store cannot take records; a result is cached ``audit_check_interval_s``.

        Raises:
            AuditUnavailableError: the last check or write failed (the reason goes to the log).
        """
        if self.audit is None:
            return
        async with self._audit_probe:  # one probe at a time; the requests waiting on it reuse its verdict
            if time.monotonic() - self._audit_checked_at >= self.settings.audit_check_interval_s:
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(self._audit_pool, self.audit.check)
                except AuditStoreError as exc:
                    if self._audit_error is None:
                        logger.error("audit store failing: %s", exc)
                    self._audit_failed(str(exc))
                else:
                    if self._audit_error is not None:
                        logger.warning("audit store writable again")
                    self._audit_error = None
                    self._audit_checked_at = time.monotonic()
        if self._audit_error is not None:
            raise AuditUnavailableError(
                "The audit trail cannot be written; the service takes no grading requests until it can.",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    # -- stages ---------------------------------------------------------------------------------------------
    async def _prepare(self, data: bytes) -> PreparedRequest:
        loop = asyncio.get_running_loop()
        self.batcher.preparing += 1
        try:
            min_side = self.pipeline.spec.preprocess.decode_min_side
            cost = await loop.run_in_executor(self._prepare_pool, partial(decoded_bytes, data, min_side=min_side))
            limit = self.settings.max_decoded_bytes
            if cost > limit:
                raise ImageTooLargeError(
                    f"Decoding this image would take about {cost / _MIB:,.0f} MiB of memory, over the limit of "
                    f"{limit / _MIB:,.0f} MiB (a PNG or TIFF costs several bytes a pixel, whatever its file size); "
                    "send it as a JPEG or with fewer pixels."
                )
            async with self.decode_budget.hold(cost):
                return await loop.run_in_executor(self._prepare_pool, self.pipeline.prepare, data)
        finally:
            self.batcher.preparing -= 1

    async def _prepare_or_error(self, data: bytes) -> PreparedRequest | RetinagradeError:
        try:
            return await self._prepare(data)
        except InputError as exc:
            self.metrics.input_errors.labels(exc.code).inc()
            return exc
        except Exception as exc:
            # One image of a batch that trips a failure no input check foresaw is that image's error (as in the
            # CLI and the cluster engine); the others are still graded and returned.
            logger.error("preparing an image failed unexpectedly: %s", failure_summary(exc), exc_info=exc)
            return PreparationFailedError("Preparing this image failed unexpectedly; the server log says where.")

    async def _respond(
        self,
        request: PreparedRequest,
        outputs: object,
        request_id: str,
        started: float,
        explain: bool,
        site: Site,
        client_request_id: str | None = None,
    ) -> tuple[GradeResult, GradeResponse, bytes | None]:
        # The site's pipeline shares the model; only its operating point (calibration, thresholds) differs.
        result = site.pipeline.finish(request, outputs, explain=explain)  # type: ignore[arg-type]
        png = None
        if result.heatmap is not None:
            loop = asyncio.get_running_loop()
            png = await loop.run_in_executor(
                self._prepare_pool, render_explanation, result, self.settings.heatmap_opacity
            )
        result.timings_ms["total"] = round((time.perf_counter() - started) * 1000.0, 2)
        self.metrics.observe_result(result.status, result.decision.grade if result.decision else None)
        if site.drift is not None:
            site.drift.observe(Observation.of(result))
            self.metrics.observe_drift(site.metric_label, site.drift)
        return result, self.to_response(result, request_id, png, client_request_id, site.name), png

    async def _record(self, pairs: list[tuple[GradeResult, GradeResponse]]) -> None:
        if self.audit is None or not pairs:
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        records = [
            AuditRecord(
                time=now,
                request_id=response.request_id,
                client_request_id=response.client_request_id,
                image_sha256=result.sha256,
                model_name=self.model_ref.name,
                model_version=self.model_ref.version,
                model_sha256=self.model_ref.sha256,
                status=result.status,
                grade=response.grade,
                referable=response.referable,
                result=to_record(response.request_id, result, site=response.site or "").without_identifiers(),
            )
            for result, response in pairs
        ]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._audit_pool, self.audit.append, records)
        except (sqlite3.Error, OSError) as exc:
            # Decided: a result without its audit record is not returned (503; the client may retry), and
            # readiness turns 503 at once, so the load balancer stops sending traffic here.
            logger.error("audit write failed; %d results withheld", len(records), exc_info=exc)
            self._audit_failed(f"audit write failed: {exc}")
            raise AuditUnavailableError(
                _AUDIT_FAILED, headers={"Retry-After": str(self.settings.retry_after_s)}
            ) from None

    # -- front-door operations -------------------------------------------------------------------------------
    async def grade(
        self,
        data: bytes,
        *,
        request_id: str,
        started: float,
        explain: bool = False,
        client_request_id: str | None = None,
        site: str | None = None,
        operating_point: str | None = None,
        evidence: str = "severity",
    ) -> tuple[GradeResponse, bytes | None]:
        """Grade one image; returns the response and, when explained, the overlay PNG.

        Raises:
            InputError: the bytes are not a readable image of an accepted kind and size, ``site`` names no
                loaded site profile, or ``operating_point`` no point of the model or the site.
            AuditUnavailableError: the result could not be audited (and is withheld).
        """
        _, response, png, _ = await self.grade_result(
            data,
            request_id=request_id,
            started=started,
            explain=explain,
            client_request_id=client_request_id,
            site=site,
            operating_point=operating_point,
            evidence=evidence,
        )
        return response, png

    async def grade_result(
        self,
        data: bytes,
        *,
        request_id: str,
        started: float,
        explain: bool = False,
        client_request_id: str | None = None,
        site: str | None = None,
        operating_point: str | None = None,
        evidence: str = "severity",
        render: Callable[[GradeResult, GradeResponse], Rendered] | None = None,
    ) -> tuple[GradeResult, GradeResponse, bytes | None, Rendered | None]:
        """As :meth:`grade`, with the pipeline's result too (its metadata, for FHIR and SR answers).

        Args:
            render: makes the representation the client asked for (a FHIR Bundle, a DICOM SR) from the answer,
                in a worker thread, before the answer is audited: an answer whose rendering fails (the error
                propagates) is neither delivered nor recorded. Its value is returned last.
        """
        chosen = self.sites.resolve(site, operating_point, evidence)
        try:
            request = await self._prepare(data)
        except InputError as exc:
            self.metrics.input_errors.labels(exc.code).inc()
            raise
        (outputs,) = await self.batcher.infer([request])
        result, response, png = await self._respond(
            request, outputs, request_id, started, explain, chosen, client_request_id
        )
        rendered = None
        if render is not None:
            rendered = await asyncio.get_running_loop().run_in_executor(self._prepare_pool, render, result, response)
        await self._record([(result, response)])
        return result, response, png, rendered

    async def grade_many_results(
        self,
        images: list[bytes | InputError],
        *,
        request_id: str,
        started: float,
        explain: bool = False,
        client_request_id: str | None = None,
        site: str | None = None,
        operating_point: str | None = None,
        evidence: str = "severity",
        render: Callable[[list[BatchAnswer]], Rendered] | None = None,
    ) -> tuple[list[BatchAnswer], Rendered | None]:
        """Grade several images, each answer its pipeline result and response; an unreadable one yields its error
        and never fails the others. ``render`` as for :meth:`grade_result`, with all the answers."""
        chosen = self.sites.resolve(site, operating_point, evidence)
        prepared = await asyncio.gather(
            *(self._prepare_or_error(item) if isinstance(item, bytes) else _done(item) for item in images)
        )
        good = [p for p in prepared if isinstance(p, PreparedRequest)]
        outputs = iter(await self.batcher.infer(good))
        answers: list[BatchAnswer] = []
        pairs: list[tuple[GradeResult, GradeResponse]] = []
        for index, item in enumerate(prepared):
            if isinstance(item, RetinagradeError):
                answers.append(item)
                continue
            result, response, _ = await self._respond(
                item, next(outputs), f"{request_id}.{index}", started, explain, chosen, client_request_id
            )
            pairs.append((result, response))
            answers.append((result, response))
        rendered = None
        if render is not None:
            rendered = await asyncio.get_running_loop().run_in_executor(self._prepare_pool, render, answers)
        await self._record(pairs)
        return answers, rendered

    def to_response(
        self,
        result: GradeResult,
        request_id: str,
        png: bytes | None,
        client_request_id: str | None = None,
        site: str = "",
    ) -> GradeResponse:
        """The HTTP answer, built from the same :class:`~retinagrade.report.ResultRecord` as every report."""
        record = to_record(request_id, result, site=site)
        timings = result.timings_ms
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
        return GradeResponse(
            request_id=request_id,
            client_request_id=client_request_id,
            status=_served_status(record),
            grade=record.grade,
            grade_name=record.grade_name,
            referable=record.referable,
            referral_reason=record.referral_reason,
            operating_point=record.operating_point or None,
            referable_threshold=record.referable_threshold,
            urgency=record.urgency,
            action=record.action,
            probabilities=list(record.probabilities) or None,
            p_referable=record.p_referable,
            confidence=record.confidence,
            p_dme=record.p_dme,
            dme=record.dme,
            quality=Quality(
                score=result.quality.score,
                is_fundus=result.quality.is_fundus,
                fundus_score=result.quality.fundus_score,
                gradable=result.quality.gradable,
                reasons=list(record.reasons),
                warning=result.quality.warning,
            ),
            model=self.model_ref,
            site=record.site or None,
            image=ImageInfo(sha256=record.sha256, width=result.original_size[0], height=result.original_size[1]),
            timings_ms=Timings(
                decode=timings.get("decode", 0.0),
                preprocess=timings.get("preprocess", 0.0),
                queue=timings.get("queue"),
                inference=timings.get("inference"),
                total=timings.get("total", 0.0),
            ),
            explanation=explanation,
            metadata=dict(record.metadata),
        )


def _served_status(record: ResultRecord) -> ResultStatus:
    if record.status == "error":  # pragma: no cover - the pipeline reports errors by raising
        raise ModelError("the pipeline returned an error result")
    return record.status


async def _done(error: RetinagradeError) -> RetinagradeError:
    return error
