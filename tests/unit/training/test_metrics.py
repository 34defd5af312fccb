"""Evaluation metrics: agreement, thresholds, calibration, operating point, intervals, the evaluation dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from retinagrade.constants import NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.training.metrics import (
    DEFAULT_THRESHOLDS,
    apply_thresholds,
    bootstrap_ci,
    choose_operating_point,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    optimise_thresholds,
    quadratic_weighted_kappa,
    referable_calibration_error,
    referable_probability,
    softmax,
    wilson_interval,
)

# A skewed grade mix like the public DR sets: mostly grade 0, few severe.
GRADE_MIX = np.array([0.49, 0.10, 0.27, 0.05, 0.09])


def _grades(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(NUM_GRADES, size=n, p=GRADE_MIX)


# ---------------------------------------------------------------------------------------------- kappa


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwk_matches_sklearn_on_random_grades(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = _grades(rng, 500)
    y_pred = np.clip(y_true + rng.integers(-2, 3, size=500), 0, NUM_GRADES - 1)
    expected = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_qwk_is_one_for_perfect_agreement_and_penalises_distance() -> None:
    y = np.array([0, 1, 2, 3, 4, 2, 0])
    assert quadratic_weighted_kappa(y, y) == pytest.approx(1.0)
    near = quadratic_weighted_kappa(y, np.clip(y + 1, 0, 4))
    far = quadratic_weighted_kappa(y, 4 - y)
    assert far < near < 1.0


def test_qwk_counts_grades_absent_from_both_raters() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(
        cohen_kappa_score(y_true, y_pred, weights="quadratic")
    )


def test_qwk_is_nan_when_undefined_and_rejects_out_of_range_grades() -> None:
    assert math.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))
    with pytest.raises(ValueError, match="must lie in"):
        quadratic_weighted_kappa([0, 5], [0, 1])


# ---------------------------------------------------------------------------------------------- thresholds


def _noisy_regression(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = _grades(rng, n)
    # A shrunk, shifted regression output, as a network trained with MSE on imbalanced grades gives.
    return 0.6 * y + 0.4 + rng.normal(0.0, 0.5, size=n), y


def test_apply_thresholds_counts_the_cuts_reached() -> None:
    grades = apply_thresholds([-1.0, 0.5, 0.49, 1.7, 3.5, 9.0], DEFAULT_THRESHOLDS)
    assert grades.tolist() == [0, 1, 0, 2, 4, 4]
    with pytest.raises(ValueError, match="strictly increasing"):
        apply_thresholds([1.0], (0.5, 0.5, 2.5, 3.5))


def test_optimised_thresholds_raise_kappa_on_noisy_regression() -> None:
    scores, y = _noisy_regression(seed=3, n=3000)
    thresholds = optimise_thresholds(scores, y)
    before = quadratic_weighted_kappa(y, apply_thresholds(scores, DEFAULT_THRESHOLDS))
    after = quadratic_weighted_kappa(y, apply_thresholds(scores, thresholds))
    assert after > before + 0.02
    assert all(np.diff(thresholds) > 0)
    # The gain is not overfitting noise: fresh data from the same model gains too.
    fresh_scores, fresh_y = _noisy_regression(seed=4, n=3000)
    assert quadratic_weighted_kappa(fresh_y, apply_thresholds(fresh_scores, thresholds)) > (
        quadratic_weighted_kappa(fresh_y, apply_thresholds(fresh_scores, DEFAULT_THRESHOLDS)) + 0.02
    )


def test_optimised_thresholds_cannot_be_improved_one_cut_at_a_time() -> None:
    scores, y = _noisy_regression(seed=5, n=600)
    thresholds = optimise_thresholds(scores, y)
    best = quadratic_weighted_kappa(y, apply_thresholds(scores, thresholds))
    for k in range(len(thresholds)):
        low = thresholds[k - 1] if k > 0 else scores.min() - 1.0
        high = thresholds[k + 1] if k + 1 < len(thresholds) else scores.max() + 1.0
        for cut in np.linspace(low, high, 202)[1:-1]:
            trial = list(thresholds)
            trial[k] = cut
            assert quadratic_weighted_kappa(y, apply_thresholds(scores, trial)) <= best + 1e-12


def test_optimised_thresholds_are_deterministic() -> None:
    scores, y = _noisy_regression(seed=6, n=800)
    assert optimise_thresholds(scores, y) == optimise_thresholds(scores.copy(), y.copy())


# ---------------------------------------------------------------------------------------------- calibration


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    logits = np.array([[2.0, 0.0, -1.0, 0.5, 1000.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    probs = softmax(logits)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.all(np.isfinite(probs))
    assert softmax(logits[:1, :4], temperature=3.0).max() < softmax(logits[:1, :4]).max()


def _sampled_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_the_sampling_temperature(true_temperature: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 3.0, size=(8000, NUM_GRADES))
    probs = softmax(logits, temperature=true_temperature)
    labels = _sampled_labels(probs, rng)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.10)


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident() -> None:
    rng = np.random.default_rng(8)
    probs = softmax(rng.normal(0.0, 2.0, size=(20000, NUM_GRADES)))
    labels = _sampled_labels(probs, rng)
    assert expected_calibration_error(probs, labels) < 0.02
    overconfident = softmax(np.log(probs), temperature=0.25)
    assert expected_calibration_error(overconfident, labels) > 0.15


def test_referable_ece_tracks_calibration_of_p_referable() -> None:
    rng = np.random.default_rng(9)
    probs = softmax(rng.normal(0.0, 2.0, size=(20000, NUM_GRADES)))
    labels = _sampled_labels(probs, rng)
    p_referable = referable_probability(probs)
    assert np.allclose(p_referable, probs[:, REFERABLE_MIN_GRADE:].sum(axis=1))
    referable = labels >= REFERABLE_MIN_GRADE
    assert referable_calibration_error(p_referable, referable) < 0.02
    assert referable_calibration_error(np.clip(p_referable + 0.2, 0, 1), referable) > 0.15


# ------------------------------------------------------------------------------------------ operating point


def test_operating_point_meets_sensitivity_with_best_specificity() -> None:
    rng = np.random.default_rng(10)
    referable = rng.random(2000) < 0.3
    scores = rng.normal(referable * 1.5, 1.0)
    point = choose_operating_point(scores, referable, min_sensitivity=0.90)
    referred = scores >= point.threshold
    assert point.constraint_met and point.method == "max_specificity"
    assert referred[referable].mean() >= 0.90
    assert point.sensitivity == pytest.approx(referred[referable].mean())
    assert point.specificity == pytest.approx((~referred[~referable]).mean())
    # No other observed threshold reaching the target has higher specificity.
    for threshold in np.unique(scores):
        flagged = scores >= threshold
        if flagged[referable].mean() >= 0.90:
            assert (~flagged[~referable]).mean() <= point.specificity + 1e-12


def test_operating_point_falls_back_to_youden_when_target_needs_referring_everyone() -> None:
    # The lowest-scoring image is referable, so 100% sensitivity means referring every image.
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    referable = np.array([1, 0, 0, 0, 1, 1, 1, 0], dtype=bool)
    point = choose_operating_point(scores, referable, min_sensitivity=1.0)
    assert not point.constraint_met and point.method == "youden"
    assert point.threshold == pytest.approx(0.6)
    assert point.sensitivity == pytest.approx(0.75) and point.specificity == pytest.approx(0.75)


def test_operating_point_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        choose_operating_point([0.1, 0.9], [True, True])


# ---------------------------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_a_published_value_and_stays_in_range() -> None:
    # Wilson 95% interval for 81/263 (Newcombe 1998, example): 0.2553-0.3662.
    low, high = wilson_interval(81, 263)
    assert low == pytest.approx(0.2553, abs=5e-4) and high == pytest.approx(0.3662, abs=5e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] < 1.0
    assert wilson_interval(0, 10)[0] == 0.0


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(11)
    small = rng.normal(1.0, 1.0, size=100)
    large = rng.normal(1.0, 1.0, size=10000)
    point, low, high = bootstrap_ci(_mean, small, n_boot=300)
    assert point == pytest.approx(small.mean()) and low < point < high
    point_large, low_large, high_large = bootstrap_ci(_mean, large, n_boot=300)
    assert low_large < point_large < high_large
    assert (high_large - low_large) < (high - low) / 5
    assert bootstrap_ci(_mean, small, n_boot=300) == (point, low, high)  # seeded


def test_bootstrap_by_group_widens_the_interval_for_duplicated_images() -> None:
    rng = np.random.default_rng(12)
    patients = rng.normal(0.0, 1.0, size=200)
    values = np.repeat(patients, 10)  # ten identical images per patient
    groups = np.repeat(np.arange(200), 10)
    _, low, high = bootstrap_ci(_mean, values, n_boot=300)
    _, group_low, group_high = bootstrap_ci(_mean, values, n_boot=300, groups=groups)
    assert (group_high - group_low) > 2.5 * (high - low)


def test_bootstrap_drops_undefined_resamples() -> None:
    referable = np.array([1] + [0] * 19, dtype=bool)
    scores = np.linspace(1.0, 0.0, 20)

    def auc(y: np.ndarray, s: np.ndarray) -> float:
        return math.nan if y.all() or not y.any() else float(roc_auc_score(y, s))

    point, low, high = bootstrap_ci(auc, referable, scores, n_boot=200)
    assert point == 1.0 and low == 1.0 and high == 1.0


# ---------------------------------------------------------------------------------------------- evaluate


def _predictions(seed: int, n: int, grades: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference grades, informative per-grade probabilities and their argmax."""
    rng = np.random.default_rng(seed)
    mix = GRADE_MIX if grades is None else np.isin(np.arange(NUM_GRADES), grades) / len(grades)
    y = rng.choice(NUM_GRADES, size=n, p=mix)
    logits = rng.normal(0.0, 1.0, size=(n, NUM_GRADES))
    logits[np.arange(n), y] += 2.5
    probs = softmax(logits)
    return y, probs, probs.argmax(axis=1)


def test_evaluate_predictions_reports_consistent_numbers() -> None:
    y, probs, pred = _predictions(seed=13, n=1000)
    p_referable = referable_probability(probs)
    result = evaluate_predictions(y, probs, pred, p_referable, referable_threshold=0.5, n_boot=100)
    assert result["n_images"] == 1000
    confusion = np.array(result["confusion_matrix"])
    assert (
        confusion.sum() == 1000
        and confusion[1].sum() == np.sum(y == 1)
        and confusion[1, 2] == np.sum((y == 1) & (pred == 2))
    )
    assert result["accuracy"] == pytest.approx(np.mean(y == pred))
    qwk = result["qwk"]
    assert qwk["value"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert qwk["ci_low"] < qwk["value"] < qwk["ci_high"]
    assert result["per_grade"][3]["recall"] == pytest.approx(np.mean(pred[y == 3] == 3))
    referable = result["referable"]
    is_ref = y >= REFERABLE_MIN_GRADE
    assert referable["auc"]["value"] == pytest.approx(roc_auc_score(is_ref, p_referable))
    sensitivity = np.mean(p_referable[is_ref] >= 0.5)
    assert referable["sensitivity"]["value"] == pytest.approx(sensitivity)
    assert referable["sensitivity"]["ci_low"] < sensitivity < referable["sensitivity"]["ci_high"]
    assert referable["counts"]["positives"] == is_ref.sum()
    assert 0.0 <= result["top_label_ece"] <= 1.0 and 0.0 <= referable["ece"] <= 1.0
    assert result["notes"] == []


def test_evaluate_predictions_survives_absent_grades_and_one_referable_class() -> None:
    y, probs, pred = _predictions(seed=14, n=200, grades=[0, 1])  # screening set without referable eyes
    result = evaluate_predictions(
        y,
        probs,
        pred,
        referable_probability(probs),
        referable_threshold=0.5,
        groups=np.arange(200) // 2,
        n_boot=50,
    )
    assert [row["recall"] for row in result["per_grade"][2:]] == [None, None, None]
    assert result["per_grade"][0]["recall"] is not None
    assert result["referable"]["auc"] is None and result["referable"]["sensitivity"] is None
    assert result["referable"]["specificity"]["value"] is not None
    assert result["n_groups"] == 100
    assert any("AUC" in note for note in result["notes"])
    assert any("recall" in note for note in result["notes"])


def test_evaluate_predictions_rejects_mismatched_inputs() -> None:
    y, probs, pred = _predictions(seed=15, n=50)
    with pytest.raises(ValueError, match="length"):
        evaluate_predictions(y[:-1], probs, pred, referable_probability(probs), 0.5, n_boot=10)
