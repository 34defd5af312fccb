"""The HTTP surface's small print: redirects, HEAD, limits, field validation, error codes, order of checks."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

JPEG = {"Content-Type": "image/jpeg"}


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_trailing_slash_is_a_404_not_a_redirect(client: TestClient, synthetic_jpeg: bytes) -> None:
    response = client.post("/v1/grade/", content=synthetic_jpeg, headers=JPEG, follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("path", ["/", "/health/live", "/health/ready"])
def test_head_is_answered_like_get(client: TestClient, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200, response.text
    assert response.content == b""


def test_a_raw_body_is_held_to_the_per_image_limit(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    limit = len(synthetic_jpeg) + 1000
    padded = synthetic_jpeg + b"\x00" * 2000  # still a decodable JPEG, and under the request limit
    with TestClient(create_app(make_settings(max_image_bytes=max(limit, 1024)))) as client:
        response = client.post("/v1/grade", content=padded, headers=JPEG)
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "image_too_large"
        assert client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG).status_code == 200


@pytest.mark.parametrize(
    "patient_id",
    [b"PAT\x1b[31m1", b"PAT\n1", b"PAT\x001", b"caf\xe9-not-utf8", b"\xff\xfe"],
    ids=["escape", "newline", "nul", "latin-1", "invalid-utf8"],
)
def test_a_patient_id_with_control_characters_or_not_utf8_is_422(
    client: TestClient, synthetic_jpeg: bytes, patient_id: bytes
) -> None:
    response = client.post(
        "/v1/grade/batch",
        files=[("files", ("a.jpg", synthetic_jpeg, "image/jpeg")), ("patient_id", (None, patient_id))],
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "validation_error" and body["details"][0]["loc"] == ["body", "patient_id", 0]


def test_a_plain_patient_id_is_kept(client: TestClient, synthetic_jpeg: bytes) -> None:
    response = client.post(
        "/v1/grade/batch", files=[("files", ("a.jpg", synthetic_jpeg, "image/jpeg"))], data={"patient_id": " P-0001/7 "}
    )
    assert response.status_code == 200 and response.json()["items"][0]["patient_id"] == "P-0001/7"


def test_a_png_with_a_bad_crc_is_a_corrupt_image(client: TestClient) -> None:
    data = bytearray(_png(64, 64))
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    response = client.post("/v1/grade", content=bytes(data), headers={"Content-Type": "image/png"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "corrupt_image"


def test_a_multi_page_tiff_is_refused_not_graded_on_page_one(
    client: TestClient, synthetic_fundus: Callable[..., np.ndarray]
) -> None:
    page = Image.fromarray(synthetic_fundus(400, 300, 200, 150, 140))
    buffer = io.BytesIO()
    page.save(buffer, "TIFF", save_all=True, append_images=[page.rotate(90)])
    response = client.post("/v1/grade", content=buffer.getvalue(), headers={"Content-Type": "image/tiff"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "multi_frame_not_supported" and "2 pages" in body["message"]


@pytest.fixture
def small_batch_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_batch_images=2))) as client:
        yield client


@pytest.mark.parametrize("count", [3, 5, 9])
def test_a_batch_over_the_file_limit_is_413(small_batch_client: TestClient, count: int) -> None:
    files = [("files", (f"{i}.jpg", b"\xff\xd8\xff", "image/jpeg")) for i in range(count)]
    response = small_batch_client.post("/v1/grade/batch", files=files)
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "request_too_large"


def test_a_full_queue_still_validates_what_it_can_first(client: TestClient, synthetic_jpeg: bytes) -> None:
    admission = client.app.state.service.admission  # type: ignore[attr-defined]
    admission.admitted = admission.limit  # as if every place were taken by requests being graded
    try:
        assert client.post("/v1/grade", json={"file": "abc"}).status_code == 415
        assert client.post("/v1/grade", params={"explain": "perhaps"}, content=b"x", headers=JPEG).status_code == 422
        full = client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG)
        assert full.status_code == 503 and full.json()["code"] == "overloaded" and full.headers["retry-after"]
    finally:
        admission.admitted = 0
    assert client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG).status_code == 200


def test_an_image_too_costly_to_decode_is_413_before_it_is_decoded(make_settings: Callable[..., Settings]) -> None:
    # 3000 x 3000 PNG: a few KB on the wire, ~63 MB decoded; the limit here is 32 MiB.
    with TestClient(create_app(make_settings(max_decoded_bytes=32 * 1024 * 1024))) as client:
        response = client.post("/v1/grade", content=_png(3000, 3000), headers={"Content-Type": "image/png"})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["code"] == "image_too_large" and "MiB" in body["message"]
        small = client.post("/v1/grade", content=_png(600, 400), headers={"Content-Type": "image/png"})
        assert small.status_code == 200
