"""Property-based fuzzing of the API from its own OpenAPI schema: whatever a client sends, never a 5xx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

EXAMPLES_PER_OPERATION = 20


@pytest.fixture
def api_schema(make_settings: Callable[..., Settings]) -> schemathesis.BaseSchema:
    # Small limits so that fuzzed bodies also reach the size checks.
    app = create_app(make_settings(max_image_bytes=200_000, max_batch_images=4))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_openapi_documents_the_endpoints(api_schema: schemathesis.BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {
        "/v1/grade",
        "/v1/grade/batch",
        "/v1/explain",
        "/v1/model",
        "/health/live",
        "/health/ready",
    } <= paths
    assert "/metrics" not in paths  # served on its own listener, not the API port
    content = api_schema.raw_schema["paths"]["/v1/grade"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg"} <= set(content)


def test_no_request_gets_a_server_error(api_schema: schemathesis.BaseSchema) -> None:
    # Called per operation rather than through schemathesis' pytest plugin, whose fixture loader does not
    # work with this pytest; the lifespan runs once, started by schemathesis' ASGI transport.
    statuses: Counter[int] = Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call()
            statuses[response.status_code] += 1
            assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:300]}"
            if response.status_code >= 400:
                body = response.json()
                assert body["code"] and body["message"], response.text

        check()
    assert sum(statuses.values()) >= 7 * 5, statuses  # every operation was exercised
    assert any(400 <= status < 500 for status in statuses), statuses
    print("fuzz statuses:", dict(statuses))
