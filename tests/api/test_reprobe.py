"""The rest of issue 20 B's re-probe: metrics cardinality, patient data in logs, the site on /v1/explain, API keys
that are only separators, CORS for the site header."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

from retinagrade.api.telemetry import HTTP_METHODS


def test_unknown_http_methods_share_one_metric_label(client: TestClient, metrics_text: Callable[..., str]) -> None:
    for index in range(40):
        client.request(f"BOGUS{index}", "/health/live")
    client.request("PROPFIND", "/v1/grade")
    methods = set(re.findall(r'retinagrade_http_requests_total\{[^}]*method="([^"]*)"', metrics_text(client)))
    assert methods <= {*HTTP_METHODS, "other"}, methods
    assert "other" in methods
