"""``retinagrade calibrate``: fit a site's operating point on its own graded photos.

What is fitted, on the photos the pipeline graded (the gate's refusals carry no model output):

1. a temperature (negative log-likelihood of the local grades, :func:`metrics.fit_temperature`);
2. the site's risk threshold on P(referable), with the product's referral rule (an eye is referred when its
   grade is 2 or worse, or when its P(referable) reaches the threshold). By default the **point estimate** of
   the target sensitivity: the highest threshold at which the chance that the *next* referable eye is referred,
   ``hits / (referable + 1)`` (the order-statistic estimate of a quantile), reaches ``min_sensitivity``. Its 95%
   Wilson interval is reported beside it. ``conservative=True`` keeps the older rule: the highest threshold
   whose *lower* 95% limit reaches the target. On ~40 referable eyes that limit costs a third of the healthy
   eyes (issue 18: sensitivity 0.965, specificity 0.558 on 476 photos of a camera whose best threshold gives
   0.90 / 0.83), so it is for sites that must prove the target, not the default;
3. the grade rule: the model's own, or cut-points on the expected grade fitted to the site (monotone, every
   band at least :data:`~retinagrade.training.decisions.MIN_BAND_WIDTH` wide), kept only when they raise
   quadratic weighted kappa in cross-validation.

The "after" numbers are honest: a stratified, patient-grouped k-fold split of the sample fits all three on
k - 1 folds and scores the held-out fold, so no image is scored by parameters fitted on it. The profile's
parameters are then fitted once more on the whole sample. A sample with fewer than
:data:`FEW_REFERABLE` referable photos gets a warning: its threshold is still the point estimate, but the
interval around the sensitivity it was chosen for is wide.
"""

from __future__ import annotations

import math
import warnings as warnings_module
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from retinagrade.constants import NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.errors import CalibrationSampleError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.postprocess import grade_rule
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation, build_reference
from retinagrade.training import metrics
from retinagrade.training.decisions import MIN_BAND_WIDTH, band_widths, fit_cut_points, referred
from retinagrade.training.report import to_jsonable

MIN_GRADED = 100
MIN_REFERABLE = 20
MIN_NON_REFERABLE = 20
#: Below this many referable photos the sensitivity a threshold is chosen for is uncertain: say so.
FEW_REFERABLE = 50
DEFAULT_FOLDS = 5
BOUND_METHOD = "two-sided 95% Wilson score interval"
POINT_ESTIMATE = "point estimate: highest threshold at which hits / (referable + 1) reaches the target"
CONSERVATIVE = "conservative: highest threshold whose lower 95% Wilson limit of sensitivity reaches the target"


@dataclass(frozen=True)
class ThresholdChoice:
    """A site's risk threshold and the sensitivity evidence behind it.

    Attributes:
        threshold: refer a grade 0-1 eye when P(referable) >= threshold.
        sensitivity: sensitivity on the sample it was chosen on (the referral rule, grade included).
        lower_bound, upper_bound: the 95% Wilson interval of that sensitivity.
        predictive: hits / (referable + 1), the chance the next referable eye is referred.
        conservative: whether the lower-bound rule chose it.
        bound_met: whether the rule's own criterion reached the target (the lower-bound rule may not).
    """

    threshold: float
    sensitivity: float
    lower_bound: float
    upper_bound: float
    predictive: float
    conservative: bool
    bound_met: bool


def site_threshold(
    p_referable: npt.ArrayLike,
    grades: npt.ArrayLike,
    referable_true: npt.ArrayLike,
    min_sensitivity: float,
    conservative: bool = False,
    alpha: float = 0.05,
) -> ThresholdChoice:
    """The highest threshold meeting the sensitivity target under the product's referral rule.

    Only thresholds at a referable image's score matter (specificity only falls between them); referable eyes
    whose grade is already 2+ are referred at any threshold. Walking down the other referable scores, the first
    one at which the criterion holds is the highest qualifying threshold, hence the best specificity.

    Args:
        p_referable: P(referable) per image.
        grades: the grade each image is reported with.
        referable_true: whether each image is referable by its local grade.
        min_sensitivity: the target.
        conservative: hold the lower confidence limit (not the point estimate) to the target.
        alpha: one minus the confidence level of the two-sided interval.
    """
    scores = np.asarray(p_referable, dtype=np.float64)
    truth = np.asarray(referable_true, dtype=bool)
    by_grade = np.asarray(grades) >= REFERABLE_MIN_GRADE
    total = int(truth.sum())
    if total == 0:
        raise ValueError("no referable images to choose a threshold on")
    always = int((truth & by_grade).sum())
    candidates = np.sort(scores[truth & ~by_grade])[::-1]
    choice: ThresholdChoice | None = None
    for k in range(len(candidates) + 1):
        threshold = 1.0 if k == 0 else float(candidates[k - 1])
        hits = always + (0 if k == 0 else int(np.sum(candidates >= threshold)))
        low, high = metrics.wilson_interval(hits, total, alpha)
        predictive = hits / (total + 1)
        met = (low if conservative else predictive) >= min_sensitivity
        choice = ThresholdChoice(threshold, hits / total, low, high, predictive, conservative, met)
        if met:
            return choice
    assert choice is not None  # the last candidate refers every referable image
    return choice


@dataclass(frozen=True)
class SiteParameters:
    """What one fit gives: a temperature, site cut-points, and a threshold for each grade rule."""

    temperature: float
    cuts: tuple[float, ...]
    with_model_rule: ThresholdChoice
    with_site_cuts: ThresholdChoice

    def threshold(self, use_cuts: bool) -> ThresholdChoice:
        return self.with_site_cuts if use_cuts else self.with_model_rule


def _fit(
    logits: np.ndarray,
    grades: np.ndarray,
    spec: ModelSpec,
    min_sensitivity: float,
    conservative: bool,
    reported: np.ndarray,
) -> SiteParameters:
    temperature = metrics.fit_temperature(logits, grades)
    probs = metrics.softmax(logits, temperature)
    p_referable = metrics.referable_probability(probs)
    truth = metrics.is_referable(grades)
    cuts = fit_cut_points(probs @ np.arange(NUM_GRADES), grades, MIN_BAND_WIDTH)
    return SiteParameters(
        temperature,
        cuts,
        site_threshold(p_referable, model_grades(probs, spec, reported), truth, min_sensitivity, conservative),
        site_threshold(p_referable, site_grades(probs, cuts), truth, min_sensitivity, conservative),
    )


def model_grades(probs: np.ndarray, spec: ModelSpec, reported: np.ndarray) -> np.ndarray:
    """The grades the model's own rule reports from these probabilities.

    A ``regression`` rule's raw output is not kept in a grade result; its grades are the ``reported`` ones.
    """
    if spec.decision.rule == "regression":
        return np.asarray(reported, dtype=np.int64)
    return np.asarray(grade_rule(probs, np.zeros(len(probs)), spec.decision), dtype=np.int64)


def site_grades(probs: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """The grades of a site's own cut-points on the expected grade."""
    return np.asarray(grade_rule(probs, np.zeros(len(probs)), Decision("expected_grade", tuple(cuts))), np.int64)


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
    conservative: bool = False,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_boot: int = 1000,
) -> SiteProfile:
    """Fit a site profile on the graded images of a local sample and measure it by cross-validation.

    Args:
        grades: local reference grades of the graded images.
        probs: the pipeline's calibrated probabilities for them (with the spec's temperature).
        groups: patient (or image) id per image; a patient never straddles folds.
        spec: the model the profile is for, read at the operating point the site had before (its "before").
        name: the site's name.
        reported_grades: the grades the pipeline reported with the spec's own parameters.
        observations: every answered image of the sample (refusals too), for the drift reference; the graded
            ones are re-scored with the site's parameters first.
        n_images: images in the sample before the gate (for the record); defaults to the graded count.
        min_sensitivity: the sensitivity target of the site's threshold.
        conservative: hold the lower 95% limit of sensitivity (not its point estimate) to the target.
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
    truth = metrics.is_referable(y)

    # -- cross-validation: fit on k - 1 folds, score the held-out fold ----------------------------------
    folds = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings_module.catch_warnings():
        # A site sample rarely holds five photos of every grade; stratifying the rarest grade is best effort
        # (sklearn says so in a warning the site's operator can do nothing about).
        warnings_module.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(np.zeros(len(y)), y, group_labels))
    for k, (_, test) in enumerate(splits):
        folds[test] = k
    oof_probs = np.zeros_like(p_spec)
    oof_model = np.zeros(len(y), dtype=np.int64)
    oof_site = np.zeros(len(y), dtype=np.int64)
    oof_threshold = np.zeros((2, len(y)))
    fold_thresholds: list[float] = []
    for k in range(n_folds):
        train, test = folds != k, folds == k
        fitted = _fit(logits[train], y[train], spec, min_sensitivity, conservative, reported[train])
        probs_test = metrics.softmax(logits[test], fitted.temperature)
        oof_probs[test] = probs_test
        oof_threshold[0, test] = fitted.with_model_rule.threshold
        oof_threshold[1, test] = fitted.with_site_cuts.threshold
        oof_model[test] = model_grades(probs_test, spec, reported[test])
        oof_site[test] = site_grades(probs_test, fitted.cuts)

    qwk_model = metrics.quadratic_weighted_kappa(y, oof_model)
    qwk_site = metrics.quadratic_weighted_kappa(y, oof_site)
    use_cuts = math.isfinite(qwk_site) and (not math.isfinite(qwk_model) or qwk_site > qwk_model)
    oof_grades = oof_site if use_cuts else oof_model
    oof_p = metrics.referable_probability(oof_probs)
    oof_referred = (oof_grades >= REFERABLE_MIN_GRADE) | (oof_p >= oof_threshold[int(use_cuts)])
    fold_thresholds = sorted({float(t) for t in oof_threshold[int(use_cuts)]})

    # -- the profile's parameters: fitted once more on the whole sample ---------------------------------
    final = _fit(logits, y, spec, min_sensitivity, conservative, reported)
    final_probs = metrics.softmax(logits, final.temperature)
    final_grades = site_grades(final_probs, final.cuts) if use_cuts else model_grades(final_probs, spec, reported)
    chosen = final.threshold(use_cuts)

    spec_p = metrics.referable_probability(p_spec)
    before = metrics.evaluate_predictions(
        y,
        p_spec,
        reported,
        spec_p,
        spec.referable_threshold,
        groups=group_labels,
        n_boot=n_boot,
        seed=seed,
        referred=referred(reported, spec_p, spec.referable_threshold),
    )
    # Each fold has its own threshold: the referral decision is the fold's; AUC, kappa and calibration are
    # measured on the held-out P(referable) and grades themselves.
    after = metrics.evaluate_predictions(
        y,
        oof_probs,
        oof_grades,
        oof_p,
        chosen.threshold,
        groups=group_labels,
        n_boot=n_boot,
        seed=seed,
        referred=oof_referred,
    )
    after["notes"] = [
        *after["notes"],
        f"cross-validated: {n_folds} stratified, patient-grouped folds; each fold's images were scored with "
        "a temperature, threshold and grade rule fitted on the other folds",
    ]
    n_referable = int(truth.sum())
    warnings = []
    if n_referable < FEW_REFERABLE:
        warnings.append(
            f"only {n_referable} referable photos (fewer than {FEW_REFERABLE}): the sensitivity the threshold was "
            f"chosen for has a wide interval ({chosen.lower_bound:.2f}-{chosen.upper_bound:.2f} "
            "on this sample); grade more referable cases to narrow it"
        )

    site_p_referable = iter(metrics.referable_probability(final_probs))
    site_grade_iter = iter(final_grades)
    rescored = [
        Observation(o.status, o.quality, float(next(site_p_referable)), int(next(site_grade_iter)))
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
        referable_threshold=chosen.threshold,
        decision_rule="expected_grade" if use_cuts else None,
        decision_thresholds=final.cuts if use_cuts else None,
        min_sensitivity=min_sensitivity,
        sample={
            "n_images": int(n_images if n_images is not None else len(y)),
            "n_graded": len(y),
            "n_referable": n_referable,
            "grade_counts": {str(g): int(c) for g, c in enumerate(counts)},
            "n_groups": len(np.unique(group_labels)),
        },
        fit={
            "model": {"name": spec.name, "version": spec.version, "operating_point": spec.operating_point},
            "temperature": {"model": spec.temperature, "site": final.temperature},
            "referable_threshold": {
                "model": spec.referable_threshold,
                "site": chosen.threshold,
                "rule": CONSERVATIVE if conservative else POINT_ESTIMATE,
                "interval": BOUND_METHOD,
                "sample_sensitivity": chosen.sensitivity,
                "sample_sensitivity_lower_bound": chosen.lower_bound,
                "sample_sensitivity_upper_bound": chosen.upper_bound,
                "predictive_sensitivity": chosen.predictive,
                "bound_met": chosen.bound_met,
                "cv_fold_thresholds": fold_thresholds,
            },
            "grade_rule": {
                "model": {"rule": spec.decision.rule, "thresholds": list(spec.decision.thresholds)},
                "site_cut_points": list(final.cuts),
                "site_band_widths": band_widths(final.cuts),
                "min_band_width": MIN_BAND_WIDTH,
                "used": "site cut-points" if use_cuts else "the model's rule",
                "cv_qwk_model_rule": to_jsonable(qwk_model),
                "cv_qwk_site_cut_points": to_jsonable(qwk_site),
            },
            "warnings": warnings,
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


def profile_warnings(profile: SiteProfile, min_sensitivity: float, conservative: bool) -> list[str]:
    """What whoever deploys the profile must read first: the fit's own warnings, a sample that cannot show the
    sensitivity target, a temperature at the end of its search range, a cross-validated specificity below 0.5."""
    fit = profile.fit["referable_threshold"]
    warnings = [f"Warning: {warning}." for warning in profile.fit.get("warnings", [])]
    if not fit["bound_met"]:
        warnings.append(
            f"The sample cannot show sensitivity >= {min_sensitivity:.2f} "
            + ("at 95% confidence " if conservative else "")
            + f"({profile.sample['n_referable']} referable photos, even when every one is referred). The threshold "
            "refers every referable photo of the sample; grade more referable cases to tighten it."
        )
    if not 0.06 < profile.temperature < 19.0:
        warnings.append(
            f"The fitted temperature {profile.temperature:.3f} sits at the end of its search range: the "
            "model is (almost) always right or always wrong on these photos. Are they part of its training "
            "data?"
        )
    specificity = (profile.metrics_after.get("referable") or {}).get("specificity") or {}
    if specificity.get("value") is not None and specificity["value"] < 0.5:
        warnings.append(
            f"At this site the model reaches the sensitivity target only by referring most healthy eyes "
            f"(cross-validated specificity {specificity['value']:.2f}): its ranking of this camera's photos is too "
            "weak (see the referable AUC). Do not deploy this model here on this profile alone."
        )
    return warnings
