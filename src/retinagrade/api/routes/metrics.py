"""Prometheus metrics, on their own listener (``metrics_port``), never on the API's public port.

Behind the load balancer only the API port is reachable; the scraper reaches the metrics port inside the
private network (the Compose network, the task's security group).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from retinagrade.api.telemetry import ServiceMetrics

router = APIRouter(tags=["operations"])


@router.api_route(
    "/metrics",
    methods=["GET", "HEAD"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def metrics(request: Request) -> Response:
    registry: ServiceMetrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


def create_metrics_app(metrics: ServiceMetrics) -> FastAPI:
    """The metrics listener's app: ``/metrics`` of the given registry, nothing else (no docs, no schema)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.metrics = metrics
    app.include_router(router)
    return app
