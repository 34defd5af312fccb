"""Start-up, readiness, authentication, metrics and the audit trail."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.audit import AuditStore
from retinagrade.api.dependencies import key_matches
from retinagrade.api.settings import Settings
from retinagrade.errors import ModelError


def test_missing_model_file_stops_start_up_with_a_clear_message(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    app = create_app(make_settings(model=tmp_path / "nowhere.json"))
    with pytest.raises(ModelError, match=r"nowhere\.json does not exist"), TestClient(app):
        pass


def test_mismatched_model_file_stops_start_up(
    make_settings: Callable[..., Settings], model_spec_path: Path, tmp_path: Path
) -> None:
    spec = json.loads(model_spec_path.read_text())
    for name in (spec["model_file"], spec.get("gate_file", "gate.json")):
        (tmp_path / name).symlink_to(model_spec_path.resolve().parent / name)
    spec["sha256"] = "0" * 64
    (tmp_path / "tampered.json").write_text(json.dumps(spec))
    with (
        pytest.raises(ModelError, match="does not match the sha256"),
        TestClient(create_app(make_settings(model=tmp_path / "tampered.json"))),
    ):
        pass


def test_ready_only_after_the_model_loaded_and_warmed_up(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    app = create_app(make_settings())
    before = TestClient(app)  # no `with`: the lifespan has not run
    assert before.get("/health/live").status_code == 200
    response = before.get("/health/ready")
    assert response.status_code == 503 and response.json()["code"] == "not_ready"
    assert before.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 503
    with TestClient(app) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["warmup_ms"] > 0 and ready.json()["model"]["sha256"]
        assert ready.json()["audit"] == "ok"
    assert TestClient(app).get("/health/ready").status_code == 503  # stopped again


def test_api_keys(make_settings: Callable[..., Settings], synthetic_jpeg: bytes) -> None:
    with TestClient(create_app(make_settings(api_keys="k-one, k-two"))) as client:

        def grade(headers: dict[str, str]) -> int:
            return client.post(
                "/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg", **headers}
            ).status_code

        assert grade({}) == 401
        assert grade({"X-API-Key": "k-three"}) == 401
        assert grade({"X-API-Key": "k-two"}) == 200
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers={"X-API-Key": "k-one"}).status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/live").status_code == 200
        assert client.get("/metrics").status_code == 404  # on its own listener, never the API port
        assert client.post("/v1/grade", content=b"").json()["code"] == "unauthorized"


def test_without_keys_the_api_is_open(client: TestClient) -> None:
    assert client.get("/v1/model").status_code == 200


def test_key_matching() -> None:
    assert key_matches("b", ["a", "b"])
    assert not key_matches("", ["a"]) and not key_matches("a", []) and not key_matches("ab", ["a"])


def test_cors_is_off_unless_configured(client: TestClient, make_settings: Callable[..., Settings]) -> None:
    headers = {"Origin": "https://clinic.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/grade", headers=headers).headers
    with TestClient(create_app(make_settings(cors_origins="https://clinic.example"))) as cors:
        response = cors.options("/v1/grade", headers=headers)
        assert response.headers["access-control-allow-origin"] == "https://clinic.example"


def test_audit_records_survive_a_restart(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes, tmp_path: Path
) -> None:
    settings = make_settings(audit_path=tmp_path / "audit" / "trail.sqlite3")
    ids = []
    for _ in range(2):  # two lives of the service on the same store
        with TestClient(create_app(settings)) as client:
            response = client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200
            ids.append(response.json()["request_id"])
    store = AuditStore(settings.audit_path)
    try:
        records = store.records()
        assert [r["request_id"] for r in records] == ids
        first = records[0]
        assert first["image_sha256"] == response.json()["image"]["sha256"]
        assert first["model_version"] == response.json()["model"]["version"]
        assert json.loads(first["result"])["status"] == first["status"]
        assert first["time"].endswith("+00:00")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store._db.execute("DELETE FROM grading_audit")
    finally:
        store.close()
    assert sqlite3.connect(settings.audit_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_metrics_expose_the_named_series(
    client: TestClient, synthetic_jpeg: bytes, metrics_text: Callable[[TestClient], str]
) -> None:
    assert client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
    client.post("/v1/grade", content=b"", headers={"Content-Type": "image/jpeg"})
    text = metrics_text(client)
    for series in (
        'retinagrade_http_requests_total{method="POST",route="/v1/grade",status="200"}',
        'retinagrade_http_requests_total{method="POST",route="/v1/grade",status="400"}',
        'retinagrade_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/grade",status="200"}',
        "retinagrade_inference_duration_seconds_count",
        "retinagrade_inference_batch_size_bucket",
        'retinagrade_results_total{status="graded"}',
        'retinagrade_grades_total{grade="0",grade_name="no DR"}',
        "retinagrade_ungradable_rate",
        "retinagrade_http_requests_in_flight",
        'retinagrade_input_errors_total{code="empty_file"}',
        "retinagrade_model_info{",
    ):
        assert series in text, series


def test_logs_are_json_lines_without_patient_ids(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(make_settings(log_level="INFO"))) as client:
        client.post(
            "/v1/grade/batch",
            files=[("files", ("a.jpg", synthetic_jpeg, "image/jpeg"))],
            data={"patient_id": "PATIENT-XYZ", "eye": "left"},
        )
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "retinagrade.api.access"]
    assert access and access[-1]["route"] == "/v1/grade/batch" and access[-1]["status"] == 200
    assert {"request_id", "latency_ms", "time"} <= set(access[-1])
    assert not any("PATIENT-XYZ" in json.dumps(line) for line in lines)


def test_threads_are_not_left_behind(make_settings: Callable[..., Settings]) -> None:
    before = threading.active_count()
    with TestClient(create_app(make_settings())):
        pass
    assert threading.active_count() <= before + 1
