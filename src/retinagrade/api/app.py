"""The FastAPI application: wiring only. ``create_app`` builds it; the lifespan loads and warms the model."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from retinagrade import __version__
from retinagrade.api.audit import AuditStore
from retinagrade.api.dependencies import require_api_key
from retinagrade.api.errors import install_error_handlers
from retinagrade.api.logging import configure_logging
from retinagrade.api.metrics import ServiceMetrics
from retinagrade.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from retinagrade.api.routes import explain, grade, health, metrics, model, ui
from retinagrade.api.service import GradingService, warm_up
from retinagrade.api.settings import Settings
from retinagrade.errors import ModelError
from retinagrade.pipeline import GradingPipeline

logger = logging.getLogger("retinagrade.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model once, prove it works on a warm-up batch, then open for traffic. Fail fast otherwise."""
    settings: Settings = app.state.settings
    try:
        pipeline = await asyncio.to_thread(GradingPipeline.load, settings.model, settings.threads, settings.max_pixels)
        batch_sizes = (1, settings.max_batch_size if settings.batching else 1)
        app.state.warmup_ms = await asyncio.to_thread(warm_up, pipeline, batch_sizes)
    except ModelError as exc:
        logger.critical("cannot start the grading service: %s", exc.message)
        raise
    audit = AuditStore(settings.audit_path) if settings.audit_enabled else None
    service = GradingService(pipeline, settings, app.state.metrics, audit)
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
        },
    )
    try:
        yield
    finally:
        app.state.ready = False
        await service.stop()
        if audit is not None:
            audit.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; ``settings`` default to the ``RETINAGRADE_*`` environment."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="retinagrade",
        version=__version__,
        summary="Diabetic retinopathy grading (ICDR 0-4) of colour fundus photographs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.ready = False
    app.state.warmup_ms = 0.0

    install_error_handlers(app)
    batch_path = "/v1/grade/batch"
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: settings.max_batch_request_bytes if path == batch_path else settings.max_request_bytes,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)

    app.include_router(health.router)
    app.include_router(metrics.router)
    protected = [Depends(require_api_key)]
    app.include_router(grade.router, dependencies=protected)
    app.include_router(explain.router, dependencies=protected)
    app.include_router(model.router, dependencies=protected)
    app.include_router(ui.router)  # the screening page: open, its API calls carry the key
    return app
