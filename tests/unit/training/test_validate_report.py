"""Pieces of the validation report that need no model: refusals by grade, the HTML page, the fast AUC."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from retinagrade.errors import CorruptImageError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.postprocess import decide_grade
from retinagrade.pipeline import GradeResult
from retinagrade.preprocessing.pipeline import PreprocessConfig
from retinagrade.preprocessing.quality import QualityAssessment
from retinagrade.training import metrics
from retinagrade.training.data import Sample
from retinagrade.training.validate_report import graded_arrays, refusals_by_grade, render_html


def _result(status: str, grade: int | None = None, warning: bool = False) -> GradeResult:
    quality = QualityAssessment(
        is_fundus=status != "not_fundus",
        gradable=status == "graded",
        score=0.8,
        reasons=("low_contrast",) if warning else (),
        warning=warning,
    )
    decision = None
    if grade is not None:
        spec = ModelSpec("m", "1", "m.onnx", "", PreprocessConfig(), 1.0, Decision("argmax"), 0.5)
        logits = np.log([0.6 if k == grade else 0.1 for k in range(5)])
        decision = decide_grade(logits, 0.0, spec)
        assert decision.grade == grade
    return GradeResult(status, quality, decision, "0" * 64, (10, 10), {})  # type: ignore[arg-type]


def test_refusals_are_counted_by_the_local_grade_and_metrics_use_graded_photos_only() -> None:
    samples = [Sample(Path(f"{i}.jpg"), g, str(i), "site") for i, g in enumerate([0, 0, 2, 2, 4])]
    outcomes = [
        _result("graded", 0),
        _result("ungradable"),
        _result("graded", 3),
        _result("not_fundus"),
        CorruptImageError("broken"),
    ]
    rows = {r["grade"]: r for r in refusals_by_grade(samples, outcomes)}
    assert (rows[0]["images"], rows[0]["graded"], rows[0]["ungradable"], rows[0]["refused_rate"]) == (2, 1, 1, 0.5)
    assert (rows[2]["not_fundus"], rows[4]["error"], rows[4]["refused_rate"]) == (1, 1, 1.0)
    assert rows[1]["images"] == 0 and rows[1]["refused_rate"] is None
    arrays = graded_arrays(samples, outcomes)
    assert arrays.index.tolist() == [0, 2] and arrays.grades.tolist() == [0, 2] and arrays.reported.tolist() == [0, 3]
    assert arrays.probs.shape == (2, 5)


def test_html_page_inlines_its_pictures(tmp_path: Path) -> None:
    png = tmp_path / "roc.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = render_html("# Title\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n![ROC](roc.png)\n", "T & co", {"roc": png})
    assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in page
    assert "<table>" in page and "<title>T &amp; co</title>" in page
    assert "<2>" not in page  # Markdown text is escaped, not trusted as HTML


def test_the_bootstrap_auc_equals_scikit_learns_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.random(200) < 0.3
        scores = np.round(rng.random(200) + truth * 0.3, 1)  # many ties
        assert metrics._auc_or_nan(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert np.isnan(metrics._auc_or_nan(np.ones(5, bool), np.arange(5.0)))


def test_kappa_is_not_applicable_when_the_local_sample_holds_one_grade_only(tmp_path: Path) -> None:
    """Kappa against a one-grade reference is 0 whatever the model says: report n/a, not 0.000 (CI 0.000-0.000)."""
    from retinagrade.training.report import format_estimate
    from retinagrade.training.validate_report import write_validation_report

    samples = [Sample(Path(f"{i}.jpg"), 4, str(i), "site") for i in range(6)]
    outcomes: list[GradeResult | CorruptImageError] = [_result("graded", g) for g in (4, 4, 3, 2, 4, 0)]
    spec = ModelSpec("m", "1", "m.onnx", "", PreprocessConfig(), 1.0, Decision("argmax"), 0.5)
    report = write_validation_report(samples, outcomes, spec, tmp_path, site=None, labels=[], n_boot=50)
    assert report.metrics["qwk"]["value"] is None
    assert format_estimate(report.metrics["qwk"]) == "n/a"
    assert "| Quadratic weighted kappa | n/a |" in report.markdown
    assert "0.000 (95% CI 0.000-0.000)" not in report.markdown
    assert any("kappa" in note for note in report.metrics["notes"])


def test_kappa_intervals_skip_resamples_that_hold_one_reference_grade() -> None:
    truth = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 4])
    pred = np.array([0, 0, 0, 1, 0, 0, 2, 0, 0, 4])
    probs = np.full((10, 5), 0.2)
    result = metrics.evaluate_predictions(truth, probs, pred, np.full(10, 0.5), 0.5, n_boot=200)
    qwk = result["qwk"]
    assert qwk["value"] == pytest.approx(metrics.quadratic_weighted_kappa(truth, pred))
    # A third of the resamples miss the one grade-4 image; their kappa (0) must not drag the interval to 0.
    assert qwk["ci_low"] > 0.0


def test_photos_graded_despite_their_quality_are_counted_by_grade_and_listed(tmp_path: Path) -> None:
    from retinagrade.training.validate_report import write_validation_report

    samples = [Sample(Path(f"{i}.jpg"), g, str(i), "site") for i, g in enumerate([0, 0, 4, 4, 4])]
    outcomes: list[GradeResult | CorruptImageError] = [
        _result("graded", 0),
        _result("ungradable"),
        _result("graded", 4, warning=True),
        _result("graded", 4),
        _result("ungradable"),
    ]
    rows = {r["grade"]: r for r in refusals_by_grade(samples, outcomes)}
    assert (rows[4]["graded"], rows[4]["graded_with_warning"], rows[4]["refused_rate"]) == (2, 1, pytest.approx(1 / 3))
    assert rows[0]["graded_with_warning"] == 0
    spec = ModelSpec("m", "1", "m.onnx", "", PreprocessConfig(), 1.0, Decision("argmax"), 0.5)
    report = write_validation_report(samples, outcomes, spec, tmp_path, site=None, labels=[], n_boot=20)
    assert "| 4 proliferative DR | 3 | 2 | 1 | 1 | 0 | 0 | 33.3% |" in report.markdown
    lines = report.files["predictions"].read_text().splitlines()
    assert lines[0].split(",")[-3:] == ["quality_warning", "site", "error"]
    assert lines[3].split(",")[-3:] == ["true", "", ""] and lines[4].split(",")[-3:] == ["false", "", ""]


def test_photos_with_a_grade_range_only_are_tabled_but_left_out_of_the_metrics(tmp_path: Path) -> None:
    """Mexican labels say NPDR (grade 1-3) without the grade: validate must still run, and count them apart."""
    from retinagrade.training.data import UNKNOWN_GRADE
    from retinagrade.training.validate_report import write_validation_report

    samples = [Sample(Path(f"{i}.jpg"), g, str(i), "site") for i, g in enumerate([0, 0, 4, 4])]
    samples += [Sample(Path(f"n{i}.jpg"), UNKNOWN_GRADE, f"n{i}", "site", grade_range=(1, 3)) for i in range(2)]
    outcomes: list[GradeResult | CorruptImageError] = [_result("graded", g) for g in (0, 0, 4, 4)]
    outcomes += [_result("graded", 2), _result("ungradable")]
    rows = refusals_by_grade(samples, outcomes)
    npdr = [r for r in rows if r["grade"] is None]
    assert len(npdr) == 1 and (npdr[0]["images"], npdr[0]["ungradable"]) == (2, 1)
    assert npdr[0]["name"] == "grade 1-3 (range only)"
    assert graded_arrays(samples, outcomes).grades.tolist() == [0, 0, 4, 4]
    spec = ModelSpec("m", "1", "m.onnx", "", PreprocessConfig(), 1.0, Decision("argmax"), 0.5)
    report = write_validation_report(samples, outcomes, spec, tmp_path, site=None, labels=[], n_boot=20)
    assert report.metrics["referable"]["counts"]["positives"] == 2
    assert "| grade 1-3 (range only) | 2 | 1 | 0 | 1 | 0 | 0 | 50.0% |" in report.markdown
    assert "2 with a grade range only" in report.markdown
    lines = report.files["predictions"].read_text().splitlines()
    assert lines[5].split(",")[1] == "1-3" and lines[1].split(",")[1] == "0"
