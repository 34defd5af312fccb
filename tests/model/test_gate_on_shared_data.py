"""The shipped gate on the real development data (``../shared/data``), through the serving path.

Skipped, with the reason, when the data folder is absent (a fresh clone). The fit's own out-of-sample
validation (leave-one-kind/source-out) is in docs/gate-report.md; these tests check that the shipped files do
what the report says on the images users would send.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retinagrade.pipeline import DEFAULT_MODEL, GradingPipeline

pytestmark = [pytest.mark.shared_data]

#: Every image is graded through the pipeline; a sample keeps the test short on 2 cores.
SAMPLE = 200


@pytest.fixture(scope="module")
def pipeline() -> GradingPipeline:
    return GradingPipeline.load(DEFAULT_MODEL, threads=1)


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _statuses(pipeline: GradingPipeline, folder: Path, images: list[str]) -> dict[str, str]:
    out = {}
    for image in images:
        request = pipeline.prepare((folder / image).read_bytes())
        out[image] = (
            "not_fundus" if not request.quality.is_fundus else ("graded" if request.quality.gradable else "ungradable")
        )
    return out


def _sample(rows: list[dict[str, str]], n: int) -> list[str]:
    images = [row["image"] for row in rows]
    rng = np.random.default_rng(0)
    return sorted(rng.choice(images, size=min(n, len(images)), replace=False).tolist())


def test_no_image_of_non_fundus_2_passes_the_gate(shared_data: Path, pipeline: GradingPipeline) -> None:
    folder = shared_data / "non-fundus-2"
    statuses = _statuses(pipeline, folder, [row["image"] for row in _rows(folder)])
    passed = sorted(image for image, status in statuses.items() if status == "graded")
    assert passed == []
    counts = Counter(statuses.values())
    assert counts["not_fundus"] >= 0.98 * len(statuses), counts


def test_scikit_image_samples_are_refused_but_the_real_retina_passes(
    shared_data: Path, pipeline: GradingPipeline
) -> None:
    folder = shared_data / "non-fundus"
    rows = _rows(folder)
    statuses = _statuses(pipeline, folder, [row["image"] for row in rows])
    for row in rows:
        name = Path(row["image"]).stem
        if name == "retina":
            assert statuses[row["image"]] != "not_fundus"
        else:
            assert statuses[row["image"]] == "not_fundus", row["image"]


#: Bars a little under the coverage docs/gate-report.md measured on the whole folder (APTOS 96.1 %, Mexico
#: 95.6 %, EyePACS-256 88.4 %, EyePACS-768 82.0 %: that folder holds EyeQ Reject photos; its Good ones are
#: tested on their own below).
@pytest.mark.parametrize(
    ("folder", "min_coverage"),
    [("aptos2019-224", 0.95), ("mexico-512", 0.93), ("eyepacs-256-graded", 0.85), ("eyepacs-768", 0.78)],
)
def test_fundus_photos_are_not_refused_as_not_a_fundus_and_mostly_graded(
    shared_data: Path, pipeline: GradingPipeline, folder: str, min_coverage: float
) -> None:
    statuses = _statuses(pipeline, shared_data / folder, _sample(_rows(shared_data / folder), SAMPLE))
    counts = Counter(statuses.values())
    assert counts["not_fundus"] <= 1, [i for i, s in statuses.items() if s == "not_fundus"]
    assert counts["graded"] >= min_coverage * len(statuses), counts


def test_good_camera_photos_are_graded(shared_data: Path, pipeline: GradingPipeline) -> None:
    folder = shared_data / "eyepacs-768"
    good = [row["image"] for row in _rows(folder) if row.get("quality") == "Good"]
    statuses = _statuses(pipeline, folder, good)
    assert Counter(statuses.values())["graded"] >= 0.97 * len(good)


def test_raw_camera_jpegs_pass_and_the_very_dark_one_is_ungradable(
    shared_data: Path, pipeline: GradingPipeline
) -> None:
    folder = shared_data / "raw-fundus-samples"
    statuses = _statuses(pipeline, folder, [row["image"] for row in _rows(folder)])
    assert statuses["images/6834_left.jpeg"] == "ungradable"
    assert all(status != "not_fundus" for status in statuses.values()), statuses
