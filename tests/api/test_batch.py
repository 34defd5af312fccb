"""POST /v1/grade/batch and the per-patient referral rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from retinagrade.referral import TaggedOutcome, patient_referrals


def test_one_bad_file_never_fails_the_others(client: TestClient, fundus_jpeg: bytes, black_png: bytes) -> None:
    files = [
        ("files", ("left.jpeg", fundus_jpeg, "image/jpeg")),
        ("files", ("broken.jpeg", fundus_jpeg[: len(fundus_jpeg) // 3], "image/jpeg")),
        ("files", ("empty.jpeg", b"", "image/jpeg")),
        ("files", ("black.png", black_png, "image/png")),
    ]
    data = {"eye": ["left", "right", "", "left"], "patient_id": ["p1", "p1", "", "p2"]}
    response = client.post("/v1/grade/batch", files=files, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    items = body["items"]
    assert [i["index"] for i in items] == [0, 1, 2, 3]
    assert items[0]["result"]["status"] == "graded" and items[0]["error"] is None
    assert items[1]["error"]["code"] == "corrupt_image" and items[1]["result"] is None
    assert items[2]["error"]["code"] == "empty_file"
    assert items[3]["result"]["status"] in ("not_fundus", "ungradable")
    assert items[0]["eye"] == "left" and items[0]["patient_id"] == "p1" and items[2]["patient_id"] is None
    assert len({i["result"]["request_id"] for i in items if i["result"]}) == 2
    patients = {p["patient_id"]: p for p in body["patients"]}
    assert set(patients) == {"p1", "p2"}
    left_referable = items[0]["result"]["referable"]
    assert patients["p1"]["decision"] == ("refer" if left_referable else "cannot_decide")
    assert patients["p2"]["decision"] == "cannot_decide"
    # The clinical rule lives in the domain; the page only words the urgency and action it is given.
    assert patients["p1"]["urgency"] == (items[0]["result"]["urgency"] if left_referable else None)
    assert items[0]["result"]["action"] in ("refer_urgently", "refer", "rescreen")
    assert items[3]["result"]["urgency"] == "retake"


def test_batch_explanations(client: TestClient, fundus_jpeg: bytes) -> None:
    files = [("files", ("a.jpeg", fundus_jpeg, "image/jpeg"))]
    body = client.post("/v1/grade/batch", files=files, params={"explain": "true"}).json()
    assert body["items"][0]["result"]["explanation"]["heatmap_png_base64"]


def test_batch_without_files_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/grade/batch", data={"eye": "left"}, headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code in (400, 422)
    response = client.post("/v1/grade/batch", files=[("other", ("a.jpeg", b"x", "image/jpeg"))])
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


def test_tags_must_match_the_files(client: TestClient, synthetic_jpeg: bytes) -> None:
    files = [
        ("files", ("a.jpeg", synthetic_jpeg, "image/jpeg")),
        ("files", ("b.jpeg", synthetic_jpeg, "image/jpeg")),
    ]
    response = client.post("/v1/grade/batch", files=files, data={"eye": ["left"]})
    assert response.status_code == 422 and response.json()["details"][0]["loc"] == ["body", "eye"]
    response = client.post("/v1/grade/batch", files=files, data={"eye": ["left", "middle"]})
    assert response.status_code == 422 and "left or right" in response.json()["message"]


def test_too_many_images_is_413(client: TestClient) -> None:
    limit = client.app.state.settings.max_batch_images  # type: ignore[attr-defined]
    files = [("files", (f"{i}.jpeg", b"x", "image/jpeg")) for i in range(limit + 1)]
    response = client.post("/v1/grade/batch", files=files)
    assert response.status_code == 413


def _outcome(index: int, eye: str | None, referable: bool | None, patient: str = "p") -> TaggedOutcome:
    return TaggedOutcome(index, patient, eye, referable)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("outcomes", "decision"),
    [
        ([_outcome(0, "left", False), _outcome(1, "right", False)], "no_refer"),
        ([_outcome(0, "left", True), _outcome(1, "right", False)], "refer"),
        ([_outcome(0, "left", True), _outcome(1, "right", None)], "refer"),
        ([_outcome(0, "left", False), _outcome(1, "right", None)], "cannot_decide"),
        ([_outcome(0, "left", False)], "cannot_decide"),
        ([_outcome(0, None, False), _outcome(1, None, False)], "cannot_decide"),
        ([_outcome(0, "left", False), _outcome(1, "left", True), _outcome(2, "right", False)], "refer"),
    ],
)
def test_referral_from_both_eyes(outcomes: list[TaggedOutcome], decision: str) -> None:
    (referral,) = patient_referrals(outcomes)
    assert referral.decision == decision
    assert sorted(i for eye in referral.eyes for i in eye.images) == [o.index for o in outcomes]


def test_referrals_are_per_patient() -> None:
    referrals = patient_referrals(
        [_outcome(0, "left", True, "a"), _outcome(1, "left", False, "b"), _outcome(2, "right", False, "b")]
    )
    assert [(r.patient_id, r.decision) for r in referrals] == [("a", "refer"), ("b", "no_refer")]


def test_batch_pairs_the_eyes_of_a_patient_without_changing_single_answers(
    make_settings: Any, paired_model: Path, left_eye_photo: Path, right_eye_photo: Path, fundus_photos: list[Path]
) -> None:
    from retinagrade.api.app import create_app

    left, right, other = (p.read_bytes() for p in (left_eye_photo, right_eye_photo, fundus_photos[-1]))
    files = [
        ("files", ("a.jpeg", left, "image/jpeg")),
        ("files", ("b.jpeg", right, "image/jpeg")),
        ("files", ("c.jpeg", other, "image/jpeg")),
    ]
    data = {"eye": ["left", "right", "left"], "patient_id": ["p1", "p1", "p2"]}
    with TestClient(create_app(make_settings(model=paired_model))) as paired_client:
        body = paired_client.post("/v1/grade/batch", files=files, data=data).json()
        single = [
            paired_client.post("/v1/grade", files={"file": (f[1][0], f[1][1], "image/jpeg")}).json() for f in files
        ]
    items = body["items"]
    graded = [i["result"]["status"] == "graded" for i in items]
    assert graded[0] and graded[1], "the test photos must be gradable"
    for item, alone in zip(items, single, strict=True):
        assert item["result"]["probabilities"] == alone["probabilities"]
        assert item["result"]["referable"] == alone["referable"]
    assert items[0]["paired"]["fellow_images"] == [1] and items[1]["paired"]["fellow_images"] == [0]
    assert items[2]["paired"] is None  # p2 has one eye in the batch
    low, high = sorted(i["result"]["p_referable"] for i in items[:2])
    assert low - 1e-6 <= items[0]["paired"]["p_referable"] <= high + 1e-6
    assert abs(sum(items[0]["paired"]["probabilities"]) - 1.0) < 1e-6
