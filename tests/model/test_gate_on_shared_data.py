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


#: Folders with camera colours (not equalised derivatives) and ICDR grades: where the issue's refusals happen.
CAMERA_FOLDERS = ("eyepacs-768", "mexico-512", "raw-fundus-samples")
#: Refusals of grade 3-4 may exceed those of grade 0 by at most this much in a folder. Measured 2026-12-07
#: (gate alone -> as served): eyepacs-768 20.0 % vs 13.3 % -> 5.7 % vs 13.3 %; mexico-512 9.6 % vs 2.5 % ->
#: 3.8 % vs 2.5 %. The gate alone fails it by 5 points in both folders.
MAX_EXCESS_REFUSAL = 0.02


@pytest.mark.slow
def test_the_sickest_eyes_are_refused_no_more_than_healthy_ones(shared_data: Path, pipeline: GradingPipeline) -> None:
    """Every graded camera-colour photo through the whole pipeline (gate, model, referable override)."""
    override = pipeline.gate.referable_override
    assert override is not None
    tally: dict[tuple[str, int], Counter[str]] = {}
    for folder in CAMERA_FOLDERS:
        rows = [row for row in _rows(shared_data / folder) if row["grade"].strip()]
        paths = [shared_data / folder / row["image"] for row in rows]
        for row, (_, outcome) in zip(rows, pipeline.grade_paths(paths, workers=2), strict=True):
            assert not isinstance(outcome, Exception), row["image"]
            grade = int(float(row["grade"]))
            counts = tally.setdefault((folder, grade), Counter())
            counts["photos"] += 1
            counts["refused"] += outcome.status != "graded"
            counts["warned"] += outcome.quality.warning
            if outcome.quality.warning:
                assert outcome.decision is not None and outcome.decision.p_referable >= override.min_p_referable
                assert grade >= 2, f"{folder}/{row['image']}: a healthy eye graded despite its quality"
            if row["image"].endswith("6834_left.jpeg"):
                assert outcome.status == "ungradable", "the very dark EyeQ Reject photo stays refused"

    def rate(folder: str, grades: tuple[int, ...], key: str = "refused") -> float:
        counts = [tally[(folder, g)] for g in grades if (folder, g) in tally]
        return sum(c[key] for c in counts) / max(1, sum(c["photos"] for c in counts))

    for folder in ("eyepacs-768", "mexico-512"):
        assert rate(folder, (3, 4)) <= rate(folder, (0,)) + MAX_EXCESS_REFUSAL, (folder, tally)
        # Healthy eyes keep the gate's verdict: no photo of grade 0 is graded despite its quality.
        assert rate(folder, (0,), "warned") <= 0.01, (folder, tally)
    grade4 = [tally[(f, 4)] for f in CAMERA_FOLDERS]
    pooled = sum(c["refused"] for c in grade4) / sum(c["photos"] for c in grade4)
    assert pooled <= 0.05, tally  # the issue's target on the maintainers' camera sets (9.5 % before)
