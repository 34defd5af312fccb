"""The FastAPI application: wiring only. ``create_app`` builds it; the lifespan loads and warms the model.

``/metrics`` is not part of this app: it is served on a separate listener by :mod:`retinagrade.api.server`
(:func:`retinagrade.api.routes.metrics.create_metrics_app`), so it is never reachable through the public port.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from retinagrade import __version__
from retinagrade.api.audit import AuditStore, AuditStoreError
from retinagrade.api.dependencies import require_api_key
from retinagrade.api.errors import install_error_handlers
from retinagrade.api.logging import configure_logging
from retinagrade.api.middleware import RequestContextMiddleware
from retinagrade.api.routes import docs, explain, grade, health, model, ui
from retinagrade.api.service import GradingService, warm_up
from retinagrade.api.settings import Settings
from retinagrade.api.sites import OPERATING_POINT_HEADER, SITE_HEADER, SiteRegistry
from retinagrade.api.telemetry import ServiceMetrics
from retinagrade.errors import ModelError, UnknownOperatingPointError
from retinagrade.pipeline import GradingPipeline

logger = logging.getLogger("retinagrade.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model once, prove it works on a warm-up batch, then open for traffic. Fail fast otherwise."""
    settings: Settings = app.state.settings
    try:
        audit = open_audit_store(settings)  # first: it is cheap, and a service that cannot audit must not start
    except AuditStoreError as exc:
        logger.critical("cannot start the grading service: %s", exc)
        raise
    try:
        pipeline = await asyncio.to_thread(
            GradingPipeline.load, settings.model, settings.threads, settings.max_pixels, settings.operating_point
        )
        batch_sizes = (1, settings.max_batch_size if settings.batching else 1)
        app.state.warmup_ms = await asyncio.to_thread(warm_up, pipeline, batch_sizes)
        sites = await asyncio.to_thread(
            SiteRegistry.load,
            pipeline,
            list(settings.site_profiles),
            settings.default_site,
            settings.drift_window,
            settings.drift_min_images,
        )
    except (ModelError, UnknownOperatingPointError) as exc:
        logger.critical("cannot start the grading service: %s", exc.message)
        if audit is not None:
            audit.close()
        raise
    service = GradingService(pipeline, settings, app.state.metrics, audit, sites)
    service.start()
    app.state.metrics.set_model(pipeline.spec)
    app.state.service = service
    app.state.ready = True
    logger.info(
        "ready",
        extra={
            "model": pipeline.spec.name,
            "model_version": pipeline.spec.version,
            "warmup_ms": app.state.warmup_ms,
            "batching": settings.batching,
            "sites": sorted(sites.sites),
        },
    )
    try:
        yield
    finally:
        app.state.ready = False
        await service.stop()
        if audit is not None:
            audit.close()


def open_audit_store(settings: Settings) -> AuditStore | None:
    """The audit store the settings name, opened and proven writable (None when auditing is off).

    Raises:
        AuditStoreError: the store cannot be opened or written (the message says why).
    """
    if not settings.audit_enabled:
        return None
    return AuditStore(settings.audit_path, min_free_bytes=settings.audit_min_free_bytes)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; ``settings`` default to the ``RETINAGRADE_*`` environment."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="retinagrade",
        version=__version__,
        summary="Diabetic retinopathy grading (ICDR 0-4) of colour fundus photographs.",
        lifespan=lifespan,
        # FastAPI's own pages load from a CDN; routes/docs.py serves them from local assets instead.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        # `POST /v1/grade/` is a 404, never a 307 to a URL built from the client's Host header.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.ready = False
    app.state.warmup_ms = 0.0

    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-ID", SITE_HEADER, OPERATING_POINT_HEADER],
            expose_headers=["X-Request-ID", "X-Client-Request-ID"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)

    app.include_router(health.router)
    if settings.docs_enabled:
        app.include_router(docs.router)
    protected = [Depends(require_api_key)]
    app.include_router(grade.router, dependencies=protected)
    app.include_router(explain.router, dependencies=protected)
    app.include_router(model.router, dependencies=protected)
    app.include_router(ui.router)  # the screening page: open, its API calls carry the key
    return app
