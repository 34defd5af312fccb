"""Pure ASGI middleware: request ids, metrics and the access log.

Bodies are read by the routes themselves, under the rules of :mod:`retinagrade.api.intake` (size, deadline,
minimum rate, memory budget), after the API key and the media type were checked.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retinagrade.api.telemetry import HTTP_METHODS, ServiceMetrics

access_log = logging.getLogger("retinagrade.api.access")
#: A client's X-Request-ID is kept (as ``client_request_id``, never as the audit key) only if it is 1-64 of
#: ``A-Z a-z 0-9 . _ -`` with at least one letter: digits alone are the usual shape of a medical record or
#: accession number, which must not end up in logs and audit rows. Anything else is dropped, not refused.
CLIENT_REQUEST_ID = re.compile(r"^(?=[^A-Za-z]*[A-Za-z])[A-Za-z0-9._-]{1,64}$")


def client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID if it is a valid id, else None."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if CLIENT_REQUEST_ID.fullmatch(candidate) else None
    return None


class RequestContextMiddleware:
    """Gives each request an id of ours (``X-Request-ID``), counts and times it, and logs one JSON line for it.

    A valid client id is echoed as ``X-Client-Request-ID`` and kept beside ours. A request whose client went
    away mid-body is labelled 499 (client closed), not 5xx.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        client_id = client_request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_id
        state["started"] = started
        status = 500
        extra_headers = [(b"x-request-id", request_id.encode())]
        if client_id is not None:
            extra_headers.append((b"x-client-request-id", client_id.encode()))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *extra_headers]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            latency = time.perf_counter() - started
            self.metrics.observe_request(template, scope["method"], status, latency)
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "client_request_id": client_id,
                    "method": scope["method"] if scope["method"] in HTTP_METHODS else "other",
                    "route": template,
                    "status": status,
                    "latency_ms": round(latency * 1000.0, 2),
                },
            )
