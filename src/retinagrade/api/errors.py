"""HTTP-level errors and the one place that renders every error as JSON.

Domain errors (:mod:`retinagrade.errors`) already carry a stable ``code``, an HTTP status and a message meant
for the client; the errors here add what only the HTTP layer knows about (bodies, fields, keys, load). Every
error response has the shape of :class:`~retinagrade.api.schemas.ErrorBody`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from retinagrade.errors import RetinagradeError

logger = logging.getLogger("retinagrade.api")


class ApiError(RetinagradeError):
    """An error of the HTTP exchange itself; may carry response headers and field details."""

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})
        self.details = details


class RequestTooLargeError(ApiError):
    code = "request_too_large"
    http_status = 413


class UnsupportedMediaTypeError(ApiError):
    code = "unsupported_media_type"
    http_status = 415


class MalformedRequestError(ApiError):
    code = "malformed_request"
    http_status = 400


class FieldValidationError(ApiError):
    code = "validation_error"
    http_status = 422


class NotExplainableError(ApiError):
    """Only a graded image has an explanation (the model never ran on the others)."""

    code = "not_explainable"
    http_status = 422


class UnauthorizedError(ApiError):
    code = "unauthorized"
    http_status = 401


class OverloadedError(ApiError):
    code = "overloaded"
    http_status = 503


class NotReadyError(ApiError):
    code = "not_ready"
    http_status = 503


class BodyTimeoutError(ApiError):
    """The body did not arrive in time or arrived too slowly (a stalled or trickling client)."""

    code = "request_timeout"
    http_status = 408


class ClientClosedError(ApiError):
    """The client went away before its request was read. Nobody reads the answer: the status is a label.

    Counted as 499 (nginx's "client closed request"), never as a server error, so it stays out of the 5xx alert.
    """

    code = "client_closed_request"
    http_status = 499


class AuditUnavailableError(ApiError):
    """The audit store cannot be written. A result that cannot be audited is not returned."""

    code = "audit_unavailable"
    http_status = 503


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_body(
    request: Request, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": getattr(request.state, "request_id", None),
    }
    if details:
        body["details"] = details
    return body


async def _render_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetinagradeError)
    status = exc.http_status
    if status >= 500 and not isinstance(exc, ApiError):
        # A domain error with a 5xx status is a deployment fault: log it, tell the client nothing internal.
        logger.error("internal error %s", exc.code, exc_info=exc)
        return JSONResponse(error_body(request, "internal_error", "The server failed to grade the image."), 500)
    headers = exc.headers if isinstance(exc, ApiError) else None
    details = exc.details if isinstance(exc, ApiError) else None
    return JSONResponse(error_body(request, exc.code, exc.message, details), status, headers=headers)


async def _render_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "message": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    return JSONResponse(
        error_body(request, "validation_error", "The request is missing a field or has an invalid value.", details),
        422,
    )


async def _render_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    # Starlette's own details (routing, multipart parsing) are written for clients and hold no internals.
    message = exc.detail if isinstance(exc.detail, str) else "The request could not be processed."
    return JSONResponse(error_body(request, code, message), exc.status_code, headers=exc.headers)


async def _render_client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own signal that the client left mid-body (a route that read the request unguarded).
    closed = ClientClosedError("The client closed the connection before the request was read.")
    return JSONResponse(error_body(request, closed.code, closed.message), closed.http_status)


async def _render_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return JSONResponse(error_body(request, "internal_error", "The server failed to handle the request."), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can raise in the one JSON error shape."""
    app.add_exception_handler(RetinagradeError, _render_domain_error)
    app.add_exception_handler(RequestValidationError, _render_validation_error)
    app.add_exception_handler(StarletteHTTPException, _render_http_error)
    app.add_exception_handler(ClientDisconnect, _render_client_disconnect)
    app.add_exception_handler(Exception, _render_unexpected)
