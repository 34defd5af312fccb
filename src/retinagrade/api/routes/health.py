"""Liveness and readiness probes (open, no API key). Both answer HEAD too, as load balancers may probe with it.

Ready means: the model is loaded and warmed up, and the audit store takes writes (a probe write, reused for
``audit_check_interval_s``). A service that could grade but not audit is not ready: every grading would be
refused with 503, so traffic must go elsewhere.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from retinagrade.api.dependencies import ServiceDep
from retinagrade.api.schemas import ErrorBody, Liveness, Readiness

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Liveness, summary="The process is up")
@router.head("/live", include_in_schema=False)
def live() -> Liveness:
    return Liveness(status="alive")


@router.head("/ready", include_in_schema=False)
@router.get(
    "/ready",
    response_model=Readiness,
    summary="The model is loaded and warmed up, and the audit store takes writes",
    responses={
        503: {"model": ErrorBody, "description": "Still starting (or stopping), or the audit store is failing."}
    },
)
async def ready(request: Request, service: ServiceDep) -> Readiness:
    await service.check_audit()
    return Readiness(
        status="ready",
        model=service.model_ref,
        warmup_ms=request.app.state.warmup_ms,
        audit="disabled" if service.audit is None else "ok",
    )
