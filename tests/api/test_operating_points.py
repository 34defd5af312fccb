"""Named operating points over HTTP: chosen per request (header or form field) or per service, always named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings


def _grade(client: TestClient, image: bytes, **kwargs: object) -> dict[str, object]:
    response = client.post("/v1/grade", files={"file": ("eye.jpeg", image, "image/jpeg")}, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_request_picks_a_named_point_and_every_answer_names_the_one_it_used(
    make_settings: Callable[..., Settings], pointed_model: Path, fundus_jpeg: bytes
) -> None:
    with TestClient(create_app(make_settings(model=pointed_model))) as client:
        default = _grade(client, fundus_jpeg)
        by_header = _grade(client, fundus_jpeg, headers={"X-Retinagrade-Operating-Point": "sensitive"})
        by_field = client.post(
            "/v1/grade/batch",
            files=[("files", ("a.jpeg", fundus_jpeg, "image/jpeg"))],
            data={"operating_point": "sensitive"},
        ).json()["items"][0]["result"]
        unknown = client.post(
            "/v1/grade",
            files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")},
            headers={"X-Retinagrade-Operating-Point": "lenient"},
        )
        card = client.get("/v1/model").json()
        records = client.app.state.service.audit.records()  # type: ignore[attr-defined]
    assert (default["operating_point"], default["referable_threshold"]) == ("balanced", 0.5)
    assert (by_header["operating_point"], by_header["referable_threshold"]) == ("sensitive", 0.05)
    assert (by_field["operating_point"], by_field["referable_threshold"]) == ("sensitive", 0.05)
    # The grade and the probabilities are the model's whatever the point; only the referral may change.
    assert by_header["grade"] == default["grade"] and by_header["probabilities"] == default["probabilities"]
    assert by_header["referable"] >= default["referable"]  # type: ignore[operator]
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_operating_point"
    assert card["operating_point"] == "balanced" and set(card["operating_points"]["points"]) == {
        "balanced",
        "sensitive",
    }
    stored = [json.loads(r["result"]) for r in records]
    assert [r["operating_point"] for r in stored] == ["balanced", "sensitive", "sensitive"]
    assert all(r["referral_reason"] in {"grade", "risk", "none"} for r in stored)


def test_the_service_default_point_comes_from_its_setting_and_a_wrong_one_stops_start_up(
    make_settings: Callable[..., Settings], pointed_model: Path, fundus_jpeg: bytes
) -> None:
    with TestClient(create_app(make_settings(model=pointed_model, operating_point="sensitive"))) as client:
        answer = _grade(client, fundus_jpeg)
        assert client.get("/v1/model").json()["operating_point"] == "sensitive"
    assert answer["operating_point"] == "sensitive"
    with (
        pytest.raises(Exception, match="lenient"),
        TestClient(create_app(make_settings(model=pointed_model, operating_point="lenient"))),
    ):
        pass


def test_an_explanation_names_its_decision_and_a_head_the_model_lacks_is_a_400(
    make_settings: Callable[..., Settings], pointed_model: Path, fundus_jpeg: bytes
) -> None:
    files = {"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}
    with TestClient(create_app(make_settings(model=pointed_model))) as client:
        png = client.post("/v1/explain", files=files, headers={"X-Retinagrade-Operating-Point": "sensitive"})
        no_head = client.post("/v1/explain?evidence=dme", files=files)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["X-Retinagrade-Operating-Point"] == "sensitive"
    assert png.headers["X-Retinagrade-Referral-Reason"] in {"grade", "risk", "none"}
    assert png.headers["X-Retinagrade-Evidence"] == "severity"
    if "dme" in json.loads(pointed_model.read_text()).get("cam_channels", []):
        assert no_head.status_code == 200 and no_head.headers["X-Retinagrade-Evidence"] == "dme"
    else:  # a model without a macular-oedema head (0.2.0): asking for its evidence is the client's error
        assert no_head.status_code == 400 and no_head.json()["code"] == "unknown_evidence"
