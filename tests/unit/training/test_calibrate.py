"""Site calibration: the conservative threshold, the sample checks, and a fit that measures itself honestly."""

from __future__ import annotations

import numpy as np
import pytest

from retinagrade.errors import CalibrationSampleError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation
from retinagrade.preprocessing.pipeline import PreprocessConfig
from retinagrade.training import metrics
from retinagrade.training.calibrate import calibrate_site, check_sample, conservative_threshold, predict_grades

SHA = "12" * 32


def _spec(rule: str = "expected_grade") -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        model_file="m.onnx",
        sha256=SHA,
        preprocess=PreprocessConfig(),
        temperature=1.0,
        decision=Decision(rule, (0.5, 1.5, 2.5, 3.5)),
        referable_threshold=0.5,
    )


def _site(n: int, seed: int = 0, shift: float = -6.0) -> tuple[np.ndarray, np.ndarray]:
    """A camera on which the model ranks well but under-calls disease: its scores are shifted to grade 0."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n, p=[0.5, 0.15, 0.2, 0.08, 0.07])
    logits = -0.9 * (np.arange(5)[None, :] - grades[:, None]) ** 2 + rng.normal(0, 2.0, (n, 5))
    logits[:, 0] -= shift  # more weight on grade 0 than the truth warrants
    return grades, metrics.softmax(logits)


@pytest.mark.parametrize("positives", [40, 80, 300])
def test_threshold_is_the_highest_whose_sensitivity_lower_bound_meets_the_target(positives: int) -> None:
    rng = np.random.default_rng(positives)
    scores = np.concatenate([rng.beta(5, 2, positives), rng.beta(2, 5, 200)])
    truth = np.arange(len(scores)) < positives
    choice = conservative_threshold(scores, truth, 0.90)
    referred = scores[truth] >= choice.threshold
    low, _ = metrics.wilson_interval(int(referred.sum()), positives)
    assert choice.bound_met and low >= 0.90 and choice.lower_bound == pytest.approx(low)
    # The next higher candidate (the next referable score above) no longer proves the target.
    higher = np.sort(scores[truth][scores[truth] > choice.threshold])
    if higher.size:
        hits = int((scores[truth] >= higher[0]).sum())
        assert metrics.wilson_interval(hits, positives)[0] < 0.90
    # The bound is stricter than the point estimate: the plain rule keeps a higher threshold.
    assert choice.threshold <= metrics.choose_operating_point(scores, truth, 0.90).threshold


def test_a_sample_too_small_to_prove_the_target_refers_every_referable_eye() -> None:
    scores = np.linspace(0.05, 0.95, 60)
    truth = np.arange(60) % 3 == 0  # 20 referable: even 20/20 has a lower bound of 0.84
    choice = conservative_threshold(scores, truth, 0.90)
    assert not choice.bound_met
    assert choice.threshold == scores[truth].min() and choice.sensitivity == 1.0
    assert choice.lower_bound == pytest.approx(metrics.wilson_interval(20, 20)[0])


@pytest.mark.parametrize(
    ("grades", "match"),
    [
        (np.array([0] * 70 + [2] * 29), "99 graded photos"),
        (np.array([0] * 100 + [3] * 19), "19 referable"),
        (np.array([0] * 10 + [4] * 100), "10 non-referable"),
    ],
)
def test_small_or_one_sided_samples_are_refused_with_the_counts(grades: np.ndarray, match: str) -> None:
    with pytest.raises(CalibrationSampleError, match=match) as caught:
        check_sample(grades)
    assert caught.value.code == "calibration_sample_too_small"


def test_calibration_restores_sensitivity_on_a_camera_that_under_calls_disease() -> None:
    grades, probs = _site(400)
    spec = _spec()
    reported = predict_grades(probs, spec.referable_threshold, spec, None)
    profile = calibrate_site(
        grades,
        probs,
        np.arange(len(grades)).astype(str),
        spec,
        name="clinic-a",
        reported_grades=reported,
        observations=[Observation("graded", 0.9, 0.0, 0) for _ in grades],
        n_boot=50,
    )
    before = profile.metrics_before["referable"]["sensitivity"]["value"]
    after = profile.metrics_after["referable"]
    assert before < 0.7, before  # the global threshold misses many referable eyes here
    assert after["sensitivity"]["value"] >= 0.90
    assert after["counts"]["positives"] + after["counts"]["negatives"] == 400
    assert profile.referable_threshold < spec.referable_threshold
    assert profile.fit["referable_threshold"]["bound_met"]
    assert any("cross-validated" in note for note in profile.metrics_after["notes"])
    assert profile.sample["n_graded"] == 400 and sum(profile.sample["grade_counts"].values()) == 400
    assert set(profile.drift_reference["signals"]) >= {"p_referable", "quality", "grade"}
    # The profile reads back and grades with the new operating point.
    again = SiteProfile.from_dict(profile.to_dict())
    assert again.apply(spec).referable_threshold == profile.referable_threshold


def test_cut_points_are_kept_only_when_they_measure_better() -> None:
    grades, probs = _site(300, seed=3)
    spec = _spec()
    reported = predict_grades(probs, spec.referable_threshold, spec, None)
    profile = calibrate_site(
        grades, probs, np.arange(300).astype(str), spec, name="c", reported_grades=reported, n_boot=20
    )
    cuts = profile.fit["decision_thresholds"]
    assert cuts["used"] == (cuts["cv_qwk_fitted_cuts"] > cuts["cv_qwk_model_cuts"])
    assert (profile.decision_thresholds is not None) == cuts["used"]
    # An argmax model has no cut-points to fit.
    argmax = _spec("argmax")
    profile = calibrate_site(
        grades,
        probs,
        np.arange(300).astype(str),
        argmax,
        name="c",
        reported_grades=predict_grades(probs, 0.5, argmax, None),
        n_boot=20,
    )
    assert profile.decision_thresholds is None and not profile.fit["decision_thresholds"]["used"]
