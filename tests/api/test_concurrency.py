"""Many requests at once: all answered, batched into shared model calls; overload gets 503 + Retry-After."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_concurrent_requests_are_all_answered_and_batched(
    make_settings: Callable[..., Settings], fundus_photos: list[Path], metrics_text: Callable[[TestClient], str]
) -> None:
    images = [p.read_bytes() for p in fundus_photos[:4]] * 3
    settings = make_settings(batching=True, max_batch_size=8, max_batch_wait_ms=100.0)
    with TestClient(create_app(settings)) as client:

        def grade(data: bytes) -> tuple[int, dict]:
            response = client.post("/v1/grade", files={"file": ("eye.jpeg", data, "image/jpeg")})
            return response.status_code, response.json()

        with ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(grade, images))
        assert [status for status, _ in answers] == [200] * len(images)
        assert len({body["request_id"] for _, body in answers}) == len(images)
        by_image: dict[str, list[float]] = {}
        for _, body in answers:
            assert body["status"] == "graded"
            probabilities = by_image.setdefault(body["image"]["sha256"], body["probabilities"])
            # Batched or not, the same image gets the same answer.
            assert body["probabilities"] == pytest.approx(probabilities, abs=1e-5)
        text = metrics_text(client)
        calls = _metric(text, "retinagrade_inference_batch_size_count")
        batched = _metric(text, "retinagrade_inference_batch_size_sum")
        assert batched == len(images) + 0 and calls < len(images), "no two requests shared a model call"


def test_overload_answers_503_with_retry_after(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes, metrics_text: Callable[[TestClient], str]
) -> None:
    with TestClient(create_app(make_settings(max_queue=2, retry_after_s=3))) as client:
        files = [("files", (f"{i}.jpeg", synthetic_jpeg, "image/jpeg")) for i in range(3)]
        response = client.post("/v1/grade/batch", files=files)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert response.json()["code"] == "overloaded"
        assert client.post("/v1/grade/batch", files=files[:2]).status_code == 200
        assert "retinagrade_overload_rejections_total 1.0" in metrics_text(client)


def test_unbatched_mode_answers_the_same(make_settings: Callable[..., Settings], fundus_jpeg: bytes) -> None:
    with TestClient(create_app(make_settings(batching=False))) as client:
        response = client.post("/v1/grade", content=fundus_jpeg, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200 and response.json()["status"] == "graded"
