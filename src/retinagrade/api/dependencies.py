"""FastAPI dependencies and their ``Annotated`` aliases, the only way routes reach app state."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from retinagrade.api.errors import NotReadyError, UnauthorizedError
from retinagrade.api.service import GradingService
from retinagrade.api.settings import Settings
from retinagrade.api.telemetry import ServiceMetrics

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required only when RETINAGRADE_API_KEYS is set."
)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def get_service(request: Request) -> GradingService:
    service: GradingService | None = getattr(request.app.state, "service", None)
    if service is None or not request.app.state.ready:
        raise NotReadyError("The model is not loaded yet; retry shortly.", headers={"Retry-After": "1"})
    return service


def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


def get_client_request_id(request: Request) -> str | None:
    value = request.state.client_request_id
    return None if value is None else str(value)


def get_started(request: Request) -> float:
    return float(request.state.started)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ServiceDep = Annotated[GradingService, Depends(get_service)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
ClientRequestIdDep = Annotated[str | None, Depends(get_client_request_id)]
StartedDep = Annotated[float, Depends(get_started)]


def key_matches(given: str, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys``, comparing every key in constant time (no early exit)."""
    given_bytes = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode())
    return found


def require_api_key(settings: SettingsDep, api_key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Checks ``X-API-Key`` when keys are configured; open otherwise."""
    if settings.api_keys and (api_key is None or not key_matches(api_key, settings.api_keys)):
        raise UnauthorizedError("A valid X-API-Key header is required.", headers={"WWW-Authenticate": "ApiKey"})
