"""Bad input gets a JSON error with a stable code and the right status; never a 5xx, and serving goes on."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings


def _png_header_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width`` x ``height`` but which carries almost no pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


def _tiff16() -> bytes:
    ramp = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) * 3
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "TIFF")
    return buffer.getvalue()


def _cmyk_jpeg(rgb_jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(rgb_jpeg)).convert("CMYK").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


BAD_INPUTS: dict[str, tuple[Callable[[bytes], bytes], set[int]]] = {
    "empty": (lambda good: b"", {400}),
    "random bytes": (lambda good: np.random.default_rng(0).bytes(5000), {415}),
    "truncated jpeg": (lambda good: good[: len(good) // 2], {400}),
    "png claiming 30000x30000": (lambda good: _png_header_claiming(30000, 30000), {413}),
    "pdf renamed .jpg": (lambda good: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", {415}),
    # A 16-bit grey TIFF and a CMYK JPEG are images: answered (200, whatever the gate says) or refused (4xx).
    "16-bit tiff": (lambda good: _tiff16(), {200, 400, 415}),
    "cmyk jpeg": (_cmyk_jpeg, {200}),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
def test_bad_images_get_client_errors(client: TestClient, synthetic_jpeg: bytes, name: str, as_multipart: bool) -> None:
    make, expected = BAD_INPUTS[name]
    data = make(synthetic_jpeg)
    if as_multipart:
        response = client.post("/v1/grade", files={"file": ("upload.jpg", data, "image/jpeg")})
    else:
        response = client.post("/v1/grade", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code in expected, response.text
    body = response.json()
    if response.status_code != 200:
        assert body["code"] and body["message"] and body["request_id"]
        assert "Traceback" not in response.text
    # ... and the server keeps serving.
    assert client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_error_codes_are_stable(client: TestClient, synthetic_jpeg: bytes) -> None:
    cases = {
        b"": "empty_file",
        synthetic_jpeg[:2000]: "corrupt_image",
        _png_header_claiming(30000, 30000): "image_too_large",
        b"%PDF-1.4 not an image": "unsupported_format",
    }
    for data, code in cases.items():
        response = client.post("/v1/grade", content=data, headers={"Content-Type": "image/jpeg"})
        assert response.json()["code"] == code


def test_wrong_media_type_is_415(client: TestClient) -> None:
    response = client.post("/v1/grade", json={"file": "abc"})
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


def test_missing_or_wrong_field_is_422(client: TestClient, synthetic_jpeg: bytes) -> None:
    response = client.post("/v1/grade", files={"image": ("a.jpg", synthetic_jpeg, "image/jpeg")})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert response.json()["details"][0]["loc"] == ["body", "file"]
    response = client.post("/v1/grade", data={"file": "not a file"}, files={"other": ("a.txt", b"x", "text/plain")})
    assert response.status_code == 422


def test_fastapi_validation_errors_have_the_same_shape(client: TestClient, synthetic_jpeg: bytes) -> None:
    response = client.post(
        "/v1/grade",
        params={"explain": "perhaps"},
        content=synthetic_jpeg,
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error" and body["message"]
    assert body["details"][0]["loc"] == ["query", "explain"]


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["code"] == "not_found"


@pytest.fixture
def small_limit_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_image_bytes=100_000, max_pixels=1_000_000))) as client:
        yield client


def test_too_many_bytes_is_413_by_content_length(small_limit_client: TestClient) -> None:
    big = b"\xff\xd8" + b"\x00" * 300_000
    response = small_limit_client.post("/v1/grade", content=big, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"


def test_too_many_bytes_is_413_while_streaming(small_limit_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the body arrives chunked
        for _ in range(40):
            yield b"\x00" * 10_000

    response = small_limit_client.post("/v1/grade", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"


def test_a_file_over_the_limit_in_a_batch_is_that_files_error(
    small_limit_client: TestClient, synthetic_jpeg: bytes
) -> None:
    files = [
        ("files", ("big.jpeg", b"\x00" * 150_000, "image/jpeg")),
        ("files", ("ok.jpeg", synthetic_jpeg, "image/jpeg")),
    ]
    response = small_limit_client.post("/v1/grade/batch", files=files)
    assert response.status_code == 200
    items = response.json()["items"]
    assert items[0]["error"]["code"] == "image_too_large" and items[1]["result"] is not None


def test_too_many_pixels_is_413(small_limit_client: TestClient) -> None:
    big = Image.new("RGB", (1200, 1000), (120, 40, 10))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=50)
    response = small_limit_client.post("/v1/grade", content=buffer.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413
    assert response.json()["code"] == "image_too_large"
