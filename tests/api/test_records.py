"""The response, the audit row and the CLI's report come from one record, so they cannot disagree."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.audit import AuditStore
from retinagrade.api.settings import Settings


def test_the_audit_row_says_what_the_response_said(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        body = client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"}).json()
    store = AuditStore(settings.audit_path)
    try:
        (row,) = store.records()
    finally:
        store.close()
    audit = json.loads(row["result"])
    for key in ("status", "grade", "grade_name", "referable", "urgency", "action", "p_referable", "confidence"):
        assert audit[key] == body[key], key
    if body["probabilities"] is not None:
        assert [audit[f"p{k}"] for k in range(5)] == body["probabilities"]
    assert audit["quality"] == body["quality"]["score"] and audit["reasons"] == body["quality"]["reasons"]
    assert audit["sha256"] == body["image"]["sha256"] == row["image_sha256"]
    # No names or patient tags in the audit trail.
    assert "image" not in audit and "metadata" not in audit
