"""The documentation pages load nothing from the internet, and can be switched off."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings


def test_docs_pages_load_only_local_assets(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200, page
        html = response.text
        assert "//" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', html)), f"{page} loads from another host"
        assert "fonts.googleapis" not in html and "cdn.jsdelivr" not in html
        for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', html) + re.findall(
            r"url: '(/docs/assets/[^']+)'", html
        ):
            assert client.get(asset).status_code == 200, asset
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/docs/assets/redoc.standalone.js").status_code == 200
    assert client.get("/docs/assets/..%2Fcore.py").status_code == 404


def test_docs_can_be_switched_off(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(docs_enabled=False))) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"):
            assert client.get(path).status_code == 404, path
        assert client.get("/health/live").status_code == 200
