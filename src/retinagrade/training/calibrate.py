"""``retinagrade calibrate``: fit a site's operating point on its own graded photos.

What is fitted, on the photos the pipeline graded (the gate's refusals carry no model output):

1. a temperature (negative log-likelihood of the local grades, :func:`metrics.fit_temperature`);
2. the referable threshold on P(referable): the **highest** threshold at which the lower limit of the
   two-sided 95% Wilson score interval of sensitivity on the local sample reaches ``min_sensitivity``. A small
   sample therefore gets a lower, safer threshold than its point estimate would allow. The Wilson interval is
   the one every report of this project prints, so the lower limit a reader sees in the report is the
   number the threshold was held to. When no threshold can prove the target (with fewer than about 35
   referable eyes even a perfect sample cannot: 35/35 has a lower limit of 0.901), the threshold refers every
   referable eye of the sample and the profile records ``bound_met: false``;
3. the grade cut-points of an ``expected_grade`` decision rule (:func:`metrics.optimise_thresholds`), kept only
   when they raise quadratic weighted kappa in cross-validation.

The "after" numbers are honest: a stratified, patient-grouped k-fold split of the sample fits all three on
k - 1 folds and scores the held-out fold, so no image is scored by parameters fitted on it. The profile's
parameters are then fitted once more on the whole sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from retinagrade.constants import NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.errors import CalibrationSampleError
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.inference.postprocess import consistent_grade
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation, build_reference
from retinagrade.training import metrics
from retinagrade.training.report import to_jsonable

MIN_GRADED = 100
MIN_REFERABLE = 20
MIN_NON_REFERABLE = 20
DEFAULT_FOLDS = 5
BOUND_METHOD = "two-sided 95% Wilson score interval, lower limit"


@dataclass(frozen=True)
class ThresholdChoice:
    """A referable threshold and the sensitivity evidence behind it.

    Attributes:
        threshold: refer when P(referable) >= threshold.
        sensitivity: sensitivity on the sample it was chosen on.
        lower_bound: lower limit of the 95% Wilson interval of that sensitivity.
        bound_met: whether ``lower_bound >= min_sensitivity``.
    """

    threshold: float
    sensitivity: float
    lower_bound: float
    bound_met: bool


def conservative_threshold(
    p_referable: npt.ArrayLike, referable_true: npt.ArrayLike, min_sensitivity: float, alpha: float = 0.05
) -> ThresholdChoice:
    """The highest threshold whose sensitivity's lower confidence limit reaches ``min_sensitivity``.

    Only thresholds at a referable image's score matter (specificity only falls between them). Sensitivity at
    the k-th highest referable score is at least k / P, and the lower limit rises with k, so the first k that
    reaches the target gives the highest qualifying threshold, hence the best specificity.

    Args:
        p_referable: P(referable) per image.
        referable_true: whether each image is referable by its local grade.
        min_sensitivity: target for the lower confidence limit.
        alpha: one minus the confidence level of the two-sided interval.
    """
    scores = np.asarray(p_referable, dtype=np.float64)
    truth = np.asarray(referable_true, dtype=bool)
    positives = np.sort(scores[truth])[::-1]
    total = len(positives)
    if total == 0:
        raise ValueError("no referable images to choose a threshold on")
    choice: ThresholdChoice | None = None
    for k in range(1, total + 1):
        threshold = float(positives[k - 1])
        hits = int(np.sum(positives >= threshold))
        low, _ = metrics.wilson_interval(hits, total, alpha)
        choice = ThresholdChoice(threshold, hits / total, low, low >= min_sensitivity)
        if choice.bound_met:
            return choice
    assert choice is not None  # k = total refers every referable image
    return choice


@dataclass(frozen=True)
class SiteParameters:
    temperature: float
    threshold: ThresholdChoice
    cuts: tuple[float, ...] | None


def _uses_cut_points(spec: ModelSpec) -> bool:
    return spec.decision.rule == "expected_grade"


def _fit(logits: np.ndarray, grades: np.ndarray, spec: ModelSpec, min_sensitivity: float) -> SiteParameters:
    temperature = metrics.fit_temperature(logits, grades)
    probs = metrics.softmax(logits, temperature)
    choice = conservative_threshold(metrics.referable_probability(probs), metrics.is_referable(grades), min_sensitivity)
    cuts = None
    if _uses_cut_points(spec):
        expected = probs @ np.arange(NUM_GRADES)
        cuts = metrics.optimise_thresholds(expected, grades, initial=spec.decision.thresholds)
    return SiteParameters(temperature, choice, cuts)


def predict_grades(
    probs: np.ndarray,
    threshold: float,
    spec: ModelSpec,
    cuts: Sequence[float] | None,
    reported: np.ndarray | None = None,
) -> np.ndarray:
    """The grades the pipeline would report with these parameters (decision rule, then referral consistency).

    A ``regression`` rule's raw output is not kept in a grade result, so for it the ``reported`` grades are
    only made consistent with the new referral decision.
    """
    p_referable = metrics.referable_probability(probs)
    rule = spec.decision.rule
    if rule == "argmax":
        raw = probs.argmax(axis=1)
    elif rule == "expected_grade":
        raw = metrics.apply_thresholds(probs @ np.arange(NUM_GRADES), cuts or spec.decision.thresholds)
    else:
        if reported is None:
            raise ValueError("a regression decision rule needs the reported grades")
        raw = reported
    return np.array(
        [
            consistent_grade(int(g), bool(p >= threshold), row)
            for g, p, row in zip(raw, p_referable, probs, strict=True)
        ],
        dtype=np.int64,
    )


def check_sample(grades: np.ndarray) -> None:
    """Refuse a sample too small to fit and to measure an operating point on."""
    graded = len(grades)
    referable = int(np.sum(grades >= REFERABLE_MIN_GRADE))
    problems = []
    if graded < MIN_GRADED:
        problems.append(f"{graded} graded photos (need at least {MIN_GRADED})")
    if referable < MIN_REFERABLE:
        problems.append(f"{referable} referable (grade {REFERABLE_MIN_GRADE}+) photos (need at least {MIN_REFERABLE})")
    if graded - referable < MIN_NON_REFERABLE:
        problems.append(f"{graded - referable} non-referable photos (need at least {MIN_NON_REFERABLE})")
    if problems:
        raise CalibrationSampleError(
            "The local sample is too small to calibrate on: "
            + "; ".join(problems)
            + ". Counted are photos the pipeline graded (ungradable and non-fundus photos carry no model output). "
            "Grade more consecutive patients, or add referable cases, and run calibrate again "
            "(docs/site-deployment.md)."
        )


def calibrate_site(
    grades: npt.ArrayLike,
    probs: npt.ArrayLike,
    groups: npt.ArrayLike,
    spec: ModelSpec,
    *,
    name: str,
    reported_grades: npt.ArrayLike,
    observations: Sequence[Observation] = (),
    n_images: int | None = None,
    min_sensitivity: float = 0.90,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_boot: int = 1000,
) -> SiteProfile:
    """Fit a site profile on the graded images of a local sample and measure it by cross-validation.

    Args:
        grades: local reference grades of the graded images.
        probs: the pipeline's calibrated probabilities for them (with the spec's temperature).
        groups: patient (or image) id per image; a patient never straddles folds.
        spec: the model the profile is for.
        name: the site's name.
        reported_grades: the grades the pipeline reported with the spec's own parameters.
        observations: every answered image of the sample (refusals too), for the drift reference; the graded
            ones are re-scored with the site's parameters first.
        n_images: images in the sample before the gate (for the record); defaults to the graded count.
        min_sensitivity: target for the lower 95% limit of sensitivity.
        n_folds: cross-validation folds.
        seed: seed of the fold assignment and the bootstrap.
        n_boot: bootstrap resamples of the kappa and AUC intervals.

    Raises:
        CalibrationSampleError: fewer than 100 graded, 20 referable or 20 non-referable images.
    """
    if not 0.0 < min_sensitivity < 1.0:
        raise ValueError(f"min_sensitivity must lie in (0, 1), got {min_sensitivity}")
    y = np.asarray(grades, dtype=np.int64)
    p_spec = np.asarray(probs, dtype=np.float64)
    group_labels = np.asarray(groups)
    reported = np.asarray(reported_grades, dtype=np.int64)
    check_sample(y)
    if observations and sum(o.status == "graded" for o in observations) != len(y):
        raise ValueError("observations must hold one graded entry per graded image, in the same order")
    # The probabilities are softmax(logits / T_spec): logits are recovered up to a per-row constant, which
    # no softmax sees. The floor keeps an underflowed probability finite.
    logits = np.log(np.maximum(p_spec, 1e-300)) * spec.temperature

    # -- cross-validation: fit on k - 1 folds, score the held-out fold ----------------------------------
    folds = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, group_labels)):
        folds[test] = k
    oof_probs = np.zeros_like(p_spec)
    oof_margin = np.zeros(len(y))
    oof_spec_cuts = np.zeros(len(y), dtype=np.int64)
    oof_site_cuts = np.zeros(len(y), dtype=np.int64)
    fold_thresholds = []
    fold_bound_met = []
    for k in range(n_folds):
        train, test = folds != k, folds == k
        fitted = _fit(logits[train], y[train], spec, min_sensitivity)
        fold_thresholds.append(fitted.threshold.threshold)
        fold_bound_met.append(fitted.threshold.bound_met)
        probs_test = metrics.softmax(logits[test], fitted.temperature)
        oof_probs[test] = probs_test
        oof_margin[test] = metrics.referable_probability(probs_test) - fitted.threshold.threshold
        threshold = fitted.threshold.threshold
        oof_spec_cuts[test] = predict_grades(probs_test, threshold, spec, None, reported[test])
        oof_site_cuts[test] = predict_grades(probs_test, threshold, spec, fitted.cuts, reported[test])

    qwk_spec_cuts = metrics.quadratic_weighted_kappa(y, oof_spec_cuts)
    qwk_site_cuts = metrics.quadratic_weighted_kappa(y, oof_site_cuts)
    use_cuts = _uses_cut_points(spec) and math.isfinite(qwk_site_cuts) and qwk_site_cuts > qwk_spec_cuts
    oof_grades = oof_site_cuts if use_cuts else oof_spec_cuts

    # -- the profile's parameters: fitted once more on the whole sample ---------------------------------
    final = _fit(logits, y, spec, min_sensitivity)
    final_probs = metrics.softmax(logits, final.temperature)

    before = metrics.evaluate_predictions(
        y,
        p_spec,
        reported,
        metrics.referable_probability(p_spec),
        spec.referable_threshold,
        groups=group_labels,
        n_boot=n_boot,
        seed=seed,
    )
    # Each fold has its own threshold, so the referral decision is "margin >= 0"; AUC and calibration are
    # measured on the held-out P(referable) itself.
    after = metrics.evaluate_predictions(
        y, oof_probs, oof_grades, oof_margin, 0.0, groups=group_labels, n_boot=1, seed=seed
    )
    auc = metrics.evaluate_predictions(
        y,
        oof_probs,
        oof_grades,
        metrics.referable_probability(oof_probs),
        final.threshold.threshold,
        groups=group_labels,
        n_boot=n_boot,
        seed=seed,
    )
    after["qwk"] = auc["qwk"]
    after["referable"]["auc"] = auc["referable"]["auc"]
    after["referable"]["threshold"] = final.threshold.threshold
    after["ci_method"] = auc["ci_method"]
    after["notes"] = [
        *after["notes"],
        f"cross-validated: {n_folds} stratified, patient-grouped folds; each fold's images were scored with "
        "a temperature, threshold and cut-points fitted on the other folds",
    ]

    final_cuts = final.cuts if use_cuts else None
    final_grades = predict_grades(final_probs, final.threshold.threshold, spec, final_cuts, reported)
    site_p_referable = iter(metrics.referable_probability(final_probs))
    site_grades = iter(final_grades)
    rescored = [
        Observation(o.status, o.quality, float(next(site_p_referable)), int(next(site_grades)))
        if o.status == "graded"
        else o
        for o in observations
    ]
    counts = np.bincount(y, minlength=NUM_GRADES)
    return SiteProfile(
        name=name,
        model_sha256=spec.sha256,
        created=datetime.now(UTC).date().isoformat(),
        temperature=final.temperature,
        referable_threshold=final.threshold.threshold,
        decision_thresholds=final_cuts,
        min_sensitivity=min_sensitivity,
        sample={
            "n_images": int(n_images if n_images is not None else len(y)),
            "n_graded": len(y),
            "n_referable": int(np.sum(y >= REFERABLE_MIN_GRADE)),
            "grade_counts": {str(g): int(c) for g, c in enumerate(counts)},
            "n_groups": len(np.unique(group_labels)),
        },
        fit={
            "model": {"name": spec.name, "version": spec.version},
            "temperature": {"model": spec.temperature, "site": final.temperature},
            "referable_threshold": {
                "model": spec.referable_threshold,
                "site": final.threshold.threshold,
                "rule": "highest threshold whose sensitivity lower bound reaches min_sensitivity",
                "bound": BOUND_METHOD,
                "sample_sensitivity": final.threshold.sensitivity,
                "sample_sensitivity_lower_bound": final.threshold.lower_bound,
                "bound_met": final.threshold.bound_met,
                "cv_fold_thresholds": fold_thresholds,
                "cv_fold_bound_met": fold_bound_met,
            },
            "decision_thresholds": {
                "rule": spec.decision.rule,
                "model": list(spec.decision.thresholds),
                "fitted": None if final.cuts is None else list(final.cuts),
                "used": use_cuts,
                "cv_qwk_model_cuts": to_jsonable(qwk_spec_cuts),
                "cv_qwk_fitted_cuts": to_jsonable(qwk_site_cuts) if _uses_cut_points(spec) else None,
            },
            "cross_validation": {"folds": n_folds, "seed": seed, "split": "StratifiedGroupKFold (grade, patient)"},
        },
        metrics_before=to_jsonable(before),
        metrics_after=to_jsonable(after),
        drift_reference=build_reference(rescored) if rescored else {},
    )


def summary_rows(profile: SiteProfile) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows of the headline numbers, for the terminal and the docs."""
    from retinagrade.training.report import format_estimate

    def pick(m: Any, *keys: str) -> Any:
        for key in keys:
            m = None if m is None else m.get(key)
        return m

    rows = []
    for label, keys in (
        ("Sensitivity", ("referable", "sensitivity")),
        ("Specificity", ("referable", "specificity")),
        ("Referable AUC", ("referable", "auc")),
        ("Quadratic weighted kappa", ("qwk",)),
    ):
        rows.append(
            (
                label,
                format_estimate(pick(profile.metrics_before, *keys)),
                format_estimate(pick(profile.metrics_after, *keys)),
            )
        )
    rows.append(
        (
            "Referable threshold",
            f"{profile.fit['referable_threshold']['model']:.3f}",
            f"{profile.referable_threshold:.3f}",
        )
    )
    rows.append(("Temperature", f"{profile.fit['temperature']['model']:.3f}", f"{profile.temperature:.3f}"))
    return rows
