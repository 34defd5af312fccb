"""Liveness and readiness probes (open, no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from retinagrade.api.dependencies import ServiceDep
from retinagrade.api.schemas import ErrorBody, Liveness, Readiness

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Liveness, summary="The process is up")
def live() -> Liveness:
    return Liveness(status="alive")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="The model is loaded and warmed up",
    responses={503: {"model": ErrorBody, "description": "Still starting (or stopping)."}},
)
def ready(request: Request, service: ServiceDep) -> Readiness:
    return Readiness(status="ready", model=service.model_ref, warmup_ms=request.app.state.warmup_ms)
