"""Request ids: the audit key is always ours; a client's X-Request-ID is kept beside it only when it is valid."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

OURS = re.compile(r"^[0-9a-f]{32}$")


def test_the_audit_key_is_ours_and_the_client_id_is_kept_beside_it(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    with TestClient(create_app(make_settings())) as client:
        answers = [
            client.post(
                "/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg", "X-Request-ID": "abc-123"}
            )
            for _ in range(2)
        ]
        records = client.app.state.service.audit.records()  # type: ignore[attr-defined]
    ids = [a.json()["request_id"] for a in answers]
    assert all(OURS.match(i) for i in ids) and len(set(ids)) == 2, "a duplicate client id became a duplicate key"
    for answer in answers:
        assert answer.headers["x-request-id"] == answer.json()["request_id"]
        assert answer.headers["x-client-request-id"] == "abc-123" == answer.json()["client_request_id"]
    assert [r["request_id"] for r in records] == ids
    assert [r["client_request_id"] for r in records] == ["abc-123", "abc-123"]


@pytest.mark.parametrize(
    "client_id",
    ["0012345678", "with space", "x" * 65, "semi;colon", "ü-umlaut", ""],
    ids=["digits-only (MRN-like)", "space", "too long", "punctuation", "non-ascii", "empty"],
)
def test_an_invalid_client_id_is_dropped_not_used(client: TestClient, synthetic_jpeg: bytes, client_id: str) -> None:
    response = client.post(
        "/v1/grade",
        content=synthetic_jpeg,
        headers={"Content-Type": "image/jpeg", "X-Request-ID": client_id.encode()},  # type: ignore[dict-item]
    )
    assert response.status_code == 200
    body = response.json()
    assert OURS.match(body["request_id"]) and body["client_request_id"] is None
    assert "x-client-request-id" not in response.headers


def test_batch_items_carry_our_ids(client: TestClient, synthetic_jpeg: bytes) -> None:
    response = client.post(
        "/v1/grade/batch",
        files=[("files", (f"{i}.jpg", synthetic_jpeg, "image/jpeg")) for i in range(2)],
        headers={"X-Request-ID": "batch-7"},
    )
    body = response.json()
    assert OURS.match(body["request_id"]) and body["client_request_id"] == "batch-7"
    assert [i["result"]["request_id"] for i in body["items"]] == [f"{body['request_id']}.{n}" for n in range(2)]
