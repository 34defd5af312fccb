"""The screening page: one HTML page and its script and stylesheet, served from package data.

The page only talks to this service (``/v1/*``, ``/health/ready``); its Content-Security-Policy forbids any
other origin, so nothing is fetched from or sent to the internet. The page itself needs no API key: the
page's own requests to ``/v1/*`` carry it when the service has keys configured.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(include_in_schema=False)

#: The assets the page is made of, with their media types: an allow-list, so no path is ever resolved.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS: dict[str, str] = {
    # Photos are shown from blob: URLs (local files) and data: URLs (heatmaps in the API's JSON).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Results are never cached by the browser; the assets are small and revalidate cheaply.
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> bytes:
    return (files("retinagrade.api") / "static" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> Response:
    return _serve("index.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
def static_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail="No such file.")
    return _serve(name)
