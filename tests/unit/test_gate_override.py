"""A confident referable answer outranks the gradability score, through the real pipeline: graded and flagged.

The shipped model and gate on synthetic photos. Synthetic discs are not photographs, so the learned detector is
left out (its verdict taken as "a fundus photo", as in tests/unit/preprocessing/test_quality.py); the rules
still refuse what is not a fundus. The gate is made to refuse the photo by its score alone (a cut-off no photo
passes) and the override's cut-off is set below or above what the model answers for it, so the tests hold for
any model: what they check is who outranks whom, and that the flag reaches the answer.
"""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retinagrade.pipeline import GradeResult, GradingPipeline
from retinagrade.preprocessing.quality import ReferableOverride
from retinagrade.report import open_writer, to_record


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def photo(synthetic_fundus: Callable[..., np.ndarray]) -> bytes:
    return _jpeg(synthetic_fundus(640, 512, 320, 256, 240, seed=1))


def _with_gate(
    pipeline: GradingPipeline, min_p_referable: float | None, refuse_by_score: bool = True
) -> GradingPipeline:
    """The loaded pipeline (same model session) without the detector, its score refusing every photo."""
    clone = copy.copy(pipeline)
    override = None if min_p_referable is None else ReferableOverride(min_p_referable)
    gate = replace(pipeline.gate, detector=None, referable_override=override)
    clone.gate = replace(gate, threshold=1e-4) if refuse_by_score else gate
    clone.detector = None
    return clone


@pytest.fixture
def p_referable(grading_pipeline: GradingPipeline, photo: bytes) -> float:
    result = _with_gate(grading_pipeline, None, refuse_by_score=False).grade(photo)
    assert result.status == "graded" and result.decision is not None, (
        "the synthetic photo passes the rules and the score"
    )
    return result.decision.p_referable


def test_a_confident_referable_answer_with_a_borderline_quality_score_is_graded_and_flagged(
    grading_pipeline: GradingPipeline, photo: bytes, p_referable: float
) -> None:
    pipeline = _with_gate(grading_pipeline, min_p_referable=p_referable * 0.5)
    request = pipeline.prepare(photo)
    assert not request.quality.gradable and request.quality.model_may_outrank and request.needs_model
    result = pipeline.grade(photo)
    assert result.status == "graded" and result.decision is not None
    assert result.quality.gradable and result.quality.warning
    assert result.quality.reasons == request.quality.reasons != ()
    assert result.decision.p_referable == pytest.approx(p_referable)
    assert result.recommendation.urgency != "retake"


def test_a_borderline_photo_without_a_confident_referable_answer_stays_ungradable(
    grading_pipeline: GradingPipeline, photo: bytes, p_referable: float
) -> None:
    pipeline = _with_gate(grading_pipeline, min_p_referable=(1.0 + p_referable) / 2)
    result = pipeline.grade(photo)
    assert result.status == "ungradable" and result.decision is None
    assert not result.quality.warning and result.quality.reasons
    assert result.recommendation.urgency == "retake"


def test_a_clearly_ungradable_photo_is_refused_whatever_the_model_would_say(
    grading_pipeline: GradingPipeline, synthetic_fundus: Callable[..., np.ndarray]
) -> None:
    dark = np.clip(synthetic_fundus(640, 512, 320, 256, 240, seed=1).astype(np.float32) * 0.1 + 0.5, 0, 255)
    pipeline = _with_gate(grading_pipeline, min_p_referable=1e-9, refuse_by_score=False)
    request = pipeline.prepare(_jpeg(dark.astype(np.uint8)))
    assert "too_dark" in request.quality.reasons and not request.needs_model
    result = pipeline.grade(_jpeg(dark.astype(np.uint8)))
    assert result.status == "ungradable" and not result.quality.warning


def test_a_non_fundus_image_is_refused_whatever_the_model_would_say(
    grading_pipeline: GradingPipeline, synthetic_fundus: Callable[..., np.ndarray]
) -> None:
    gray = cv2.cvtColor(synthetic_fundus(512, 512, 256, 256, 240), cv2.COLOR_RGB2GRAY)
    pipeline = _with_gate(grading_pipeline, min_p_referable=1e-9)
    result = pipeline.grade(_jpeg(np.repeat(gray[..., None], 3, axis=2)))
    assert result.status == "not_fundus" and not result.quality.warning and result.decision is None


def test_the_flag_reaches_every_written_answer(
    grading_pipeline: GradingPipeline, photo: bytes, p_referable: float, tmp_path: Path
) -> None:
    flagged = _with_gate(grading_pipeline, min_p_referable=p_referable * 0.5).grade(photo)
    plain = _with_gate(grading_pipeline, None, refuse_by_score=False).grade(photo)
    path = tmp_path / "results.csv"
    writer = open_writer(path)
    for name, result in (("flagged.jpg", flagged), ("plain.jpg", plain)):
        writer.write(to_record(name, result))
    writer.close()
    rows = {row["image"]: row for row in csv.DictReader(path.open(newline=""))}
    assert rows["flagged.jpg"]["quality_warning"] == "true" and rows["flagged.jpg"]["status"] == "graded"
    assert rows["flagged.jpg"]["reasons"] and not rows["plain.jpg"]["reasons"]
    assert rows["plain.jpg"]["quality_warning"] == "false"
    assert to_record("x", flagged).without_identifiers()["quality_warning"] is True  # the audit row


def test_a_flagged_answer_is_coded_as_graded_with_a_quality_problem(
    grading_pipeline: GradingPipeline, photo: bytes, p_referable: float
) -> None:
    from retinagrade.interop.findings import QUALITY_PROBLEM, finding_from, finding_from_record

    flagged: GradeResult = _with_gate(grading_pipeline, min_p_referable=p_referable * 0.5).grade(photo)
    for finding in (finding_from(flagged), finding_from_record(to_record("x", flagged))):
        assert finding.status == "graded" and finding.gradable and finding.quality_warning
        assert finding.reasons == flagged.quality.reasons and finding.reason_concept == QUALITY_PROBLEM
    plain = finding_from_record(to_record("y", _with_gate(grading_pipeline, None, refuse_by_score=False).grade(photo)))
    assert not plain.quality_warning and plain.reasons == ()
