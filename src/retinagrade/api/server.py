"""Running the service: the API listener and a separate ``/metrics`` listener, under one uvicorn process.

``retinagrade serve`` calls :func:`serve`. What it adds over a bare ``uvicorn.run``:

* a pre-flight check of the settings, the audit store and the metrics port, so a bad configuration stops
  start-up with one clear line and exit status 2, not a traceback from inside the lifespan;
* ``/metrics`` on its own port (``metrics_port``), never on the public one;
* a bounded shutdown (``shutdown_timeout_s``): requests still in flight then are cancelled, so a stalled client
  cannot hold a deploy.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvicorn
from pydantic import ValidationError

from retinagrade.api.app import create_app, open_audit_store
from retinagrade.api.audit import AuditStoreError
from retinagrade.api.routes.metrics import create_metrics_app
from retinagrade.api.settings import Settings

#: Exit status of a start-up refused for its configuration (uvicorn uses 3 for a failed lifespan).
CONFIG_ERROR = 2


def preflight(host: str) -> Settings:
    """The settings, checked before anything starts: exits with a one-line message when they are unusable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        _refuse(f"invalid RETINAGRADE_* settings: {problems}")
    try:
        store = open_audit_store(settings)
    except AuditStoreError as exc:
        _refuse(f"{exc} (set RETINAGRADE_AUDIT_PATH to a writable file, or RETINAGRADE_AUDIT_ENABLED=false)")
    if store is not None:
        store.close()
    metrics_host = settings.metrics_host or host
    try:
        with socket.create_server((metrics_host, settings.metrics_port)):
            pass
    except OSError as exc:
        _refuse(
            f"cannot listen for /metrics on {metrics_host}:{settings.metrics_port}: {exc.strerror or exc} "
            "(set RETINAGRADE_METRICS_PORT to a free port)"
        )
    return settings


def _refuse(message: str) -> None:
    print(f"retinagrade: cannot start the grading service: {message}", file=sys.stderr)
    raise SystemExit(CONFIG_ERROR)


def _config(app: object, host: str, port: int, settings: Settings, *, lifespan: str = "auto") -> uvicorn.Config:
    # The service logs one JSON line per request itself; uvicorn's access log would duplicate it.
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        lifespan=lifespan,  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def serve(host: str, port: int, workers: int = 1) -> None:
    """Serve the API on ``host:port`` and ``/metrics`` on ``metrics_host:metrics_port`` until a signal."""
    settings = preflight(host)
    if workers > 1:
        # Each worker process would need its own metrics port; scale with replicas instead (one model each).
        print(
            "retinagrade: with --workers > 1 the /metrics listener is not started (one registry per process); "
            "prefer one worker per container",
            file=sys.stderr,
        )
        uvicorn.run(
            "retinagrade.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
        return
    app = create_app(settings)
    api = uvicorn.Server(_config(app, host, port, settings))
    metrics_app = create_metrics_app(app.state.metrics)
    metrics = uvicorn.Server(
        _config(metrics_app, settings.metrics_host or host, settings.metrics_port, settings, lifespan="off")
    )
    if not asyncio.run(_serve_both(api, metrics)):
        sys.exit(3)  # the API did not start (its lifespan logged why), as uvicorn.run does


async def _serve_both(api: uvicorn.Server, metrics: uvicorn.Server) -> bool:
    """Run both servers; the API's shutdown (signal or failed start-up) stops the metrics listener too."""
    metrics_task = asyncio.create_task(metrics.serve())
    await asyncio.sleep(0)  # the metrics server installs its signal handlers first, the API's override them
    try:
        await api.serve()
    finally:
        metrics.should_exit = True
        await metrics_task
    return api.started
