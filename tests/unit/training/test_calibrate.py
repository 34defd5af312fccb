"""Site calibration: the point-estimate and conservative thresholds, the sample checks, the grade rule, and a fit
that measures itself honestly."""

from __future__ import annotations

import numpy as np
import pytest

from retinagrade.errors import CalibrationSampleError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation
from retinagrade.preprocessing.pipeline import PreprocessConfig
from retinagrade.training import metrics
from retinagrade.training.calibrate import calibrate_site, check_sample, model_grades, site_threshold

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
def test_the_point_estimate_is_the_highest_threshold_whose_next_eye_chance_meets_the_target(positives: int) -> None:
    rng = np.random.default_rng(positives)
    scores = np.concatenate([rng.beta(5, 2, positives), rng.beta(2, 5, 200)])
    truth = np.arange(len(scores)) < positives
    grades = np.zeros(len(scores), int)
    choice = site_threshold(scores, grades, truth, 0.90)
    hits = int((scores[truth] >= choice.threshold).sum())
    assert choice.bound_met and hits / (positives + 1) >= 0.90 and choice.predictive == hits / (positives + 1)
    low, high = metrics.wilson_interval(hits, positives)
    assert (choice.lower_bound, choice.upper_bound) == pytest.approx((low, high))
    # the next higher candidate no longer reaches it
    higher = np.sort(scores[truth][scores[truth] > choice.threshold])
    if higher.size:
        assert (scores[truth] >= higher[0]).sum() / (positives + 1) < 0.90
    # The conservative rule holds the lower limit to the target: a lower threshold, more healthy eyes referred.
    strict = site_threshold(scores, grades, truth, 0.90, conservative=True)
    assert strict.threshold <= choice.threshold and strict.conservative
    if strict.bound_met:
        assert strict.lower_bound >= 0.90


def test_referable_grades_count_as_referred_whatever_the_threshold() -> None:
    # Half the referable eyes are graded 2+: they are referred anyway, so the threshold can rise.
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.beta(5, 2, 60), rng.beta(2, 5, 200)])
    truth = np.arange(len(scores)) < 60
    with_grades = np.where(np.arange(len(scores)) < 30, 2, 0)
    assert (
        site_threshold(scores, with_grades, truth, 0.9).threshold
        > site_threshold(scores, np.zeros(len(scores), int), truth, 0.9).threshold
    )


def test_a_sample_too_small_to_prove_the_target_refers_every_referable_eye_when_conservative() -> None:
    scores = np.linspace(0.05, 0.95, 60)
    truth = np.arange(60) % 3 == 0  # 20 referable: even 20/20 has a lower bound of 0.84
    choice = site_threshold(scores, np.zeros(60, int), truth, 0.90, conservative=True)
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


def _reported(probs: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return model_grades(probs, spec, np.zeros(len(probs), int))


def test_calibration_restores_sensitivity_on_a_camera_that_under_calls_disease() -> None:
    grades, probs = _site(400)
    spec = _spec()
    profile = calibrate_site(
        grades,
        probs,
        np.arange(len(grades)).astype(str),
        spec,
        name="clinic-a",
        reported_grades=_reported(probs, spec),
        observations=[Observation("graded", 0.9, 0.0, 0) for _ in grades],
        n_boot=50,
    )
    before = profile.metrics_before["referable"]["sensitivity"]["value"]
    after = profile.metrics_after["referable"]
    assert before < 0.7, before  # the global threshold misses many referable eyes here
    assert after["sensitivity"]["value"] >= 0.85
    assert after["counts"]["positives"] + after["counts"]["negatives"] == 400
    fit = profile.fit["referable_threshold"]
    # On its own sample the site's rule (grades, and risk at the site's threshold) refers >= 90% of the
    # referable eyes, counting the next one: the point estimate.
    assert fit["predictive_sensitivity"] >= 0.90
    assert fit["bound_met"] and fit["rule"].startswith("point estimate")
    assert fit["sample_sensitivity_lower_bound"] < fit["sample_sensitivity"] < fit["sample_sensitivity_upper_bound"]
    assert any("cross-validated" in note for note in profile.metrics_after["notes"])
    assert profile.sample["n_graded"] == 400 and sum(profile.sample["grade_counts"].values()) == 400
    assert set(profile.drift_reference["signals"]) >= {"p_referable", "quality", "grade"}
    # The profile reads back and grades at its own operating point, named "site".
    again = SiteProfile.from_dict(profile.to_dict())
    applied = again.apply(spec)
    assert applied.referable_threshold == profile.referable_threshold and applied.operating_point == "site"


def test_the_conservative_rule_refers_more_healthy_eyes_than_the_point_estimate() -> None:
    grades, probs = _site(300, seed=7)
    spec = _spec()
    common = {"name": "c", "reported_grades": _reported(probs, spec), "n_boot": 20}
    plain = calibrate_site(grades, probs, np.arange(300).astype(str), spec, **common)
    strict = calibrate_site(grades, probs, np.arange(300).astype(str), spec, conservative=True, **common)
    assert strict.referable_threshold <= plain.referable_threshold
    assert strict.fit["referable_threshold"]["rule"].startswith("conservative")
    spec_plain = plain.metrics_after["referable"]["specificity"]["value"]
    assert strict.metrics_after["referable"]["specificity"]["value"] <= spec_plain


def test_few_referable_photos_give_a_warning() -> None:
    grades, probs = _site(300, seed=3)
    spec = _spec()
    profile = calibrate_site(
        grades, probs, np.arange(300).astype(str), spec, name="c", reported_grades=_reported(probs, spec), n_boot=20
    )
    referable = profile.sample["n_referable"]
    assert (referable < 50) == bool(profile.fit["warnings"]), referable


def test_site_cut_points_are_kept_only_when_they_measure_better_and_keep_every_band_wide() -> None:
    grades, probs = _site(300, seed=3)
    for rule in ("expected_grade", "argmax"):
        spec = _spec(rule)
        profile = calibrate_site(
            grades, probs, np.arange(300).astype(str), spec, name="c", reported_grades=_reported(probs, spec), n_boot=20
        )
        fit = profile.fit["grade_rule"]
        used = fit["cv_qwk_site_cut_points"] > fit["cv_qwk_model_rule"]
        assert fit["used"] == ("site cut-points" if used else "the model's rule")
        assert (profile.decision_rule == "expected_grade") == used
        assert min(fit["site_band_widths"]) >= 0.3 - 1e-9
        if used:
            applied = profile.apply(spec)
            assert applied.decision.rule == "expected_grade"
            assert applied.decision.thresholds == profile.decision_thresholds


def test_a_profile_names_what_must_be_read_before_it_is_deployed() -> None:
    import dataclasses

    from retinagrade.training.calibrate import profile_warnings

    grades, probs = _site(400)
    spec = _spec()
    profile = calibrate_site(
        grades, probs, np.arange(400).astype(str), spec, name="a", reported_grades=_reported(probs, spec), n_boot=20
    )
    assert profile_warnings(profile, 0.90, conservative=False) == []  # a sound fit on a sound sample
    fit = {**profile.fit, "warnings": ["only 30 referable photos"]}
    fit["referable_threshold"] = {**fit["referable_threshold"], "bound_met": False}
    weak = {**profile.metrics_after, "referable": {"specificity": {"value": 0.31}}}
    doubtful = dataclasses.replace(profile, fit=fit, temperature=0.05, metrics_after=weak)
    said = profile_warnings(doubtful, 0.90, conservative=True)
    assert said[0] == "Warning: only 30 referable photos."
    assert "cannot show sensitivity >= 0.90 at 95% confidence" in said[1]
    assert "temperature 0.050 sits at the end of its search range" in said[2]
    assert "cross-validated specificity 0.31" in said[3] and "Do not deploy" in said[3]
    assert len(said) == 4
