"""The photographs in ``tests/fixtures``: small, their source and licence stated, and still what the tests
that run on them in a fresh clone take them for."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: File -> (status, a reason the gate must give) under the shipped model.
EXPECTED = {
    "retina_right.jpg": ("graded", None),
    "retina_left.jpg": ("graded", None),
    "retina_dark_left.jpg": ("ungradable", "too_dark"),
    "chelsea.jpg": ("not_fundus", "not_fundus"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_shipped_gate_says_of_each_fixture_what_the_tests_expect(grading_pipeline, name: str) -> None:
    status, reason = EXPECTED[name]
    result = grading_pipeline.grade((FIXTURES / name).read_bytes())
    assert result.status == status, (name, result.quality)
    if reason is None:
        assert result.quality.gradable and not result.quality.reasons
        assert result.decision is not None and 0 <= result.decision.grade <= 4
    else:
        assert reason in result.quality.reasons
        assert result.decision is None


def test_the_right_eye_is_the_left_one_mirrored_not_the_same_image(grading_pipeline) -> None:
    right, left = (grading_pipeline.grade((FIXTURES / f"retina_{side}.jpg").read_bytes()) for side in ("right", "left"))
    assert right.decision.probabilities != left.decision.probabilities


def test_every_fixture_is_small_and_its_source_and_licence_are_stated() -> None:
    photos = sorted(p for p in FIXTURES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".dcm", ".tif"})
    assert {p.name for p in photos} == set(EXPECTED)
    assert sum(p.stat().st_size for p in photos) < 200_000
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (FIXTURES / "README.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for photo in photos:
        assert photo.stat().st_size < 64_000, photo.name
        assert "CC0" in rows[photo.name], f"README.md must state the source and licence of {photo.name}"


def test_the_camera_sized_photo_is_graded(grading_pipeline, camera_jpeg: bytes) -> None:
    from retinagrade.preprocessing.decode import decode_image

    assert decode_image(camera_jpeg, min_side=1).original_size[0] >= 2592
    assert grading_pipeline.grade(camera_jpeg).status == "graded"
