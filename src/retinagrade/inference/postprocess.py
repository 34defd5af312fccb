"""From model outputs to a grade: calibration, grade rule, referral and its reason at an operating point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinagrade.constants import GRADE_NAMES, REFERABLE_MIN_GRADE, ReferralReason
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.referral import Urgency, urgency_of_grade


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities (float64, so that rows sum to 1 within metrics' tolerance)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def grade_from_score(score: np.ndarray | float, thresholds: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Grade = number of thresholds a continuous grade score reaches (works on scalars and arrays)."""
    return np.asarray(np.searchsorted(np.asarray(thresholds), score, side="right"))


def referral_reason(
    grade: int, p_referable: float, threshold: float, min_grade: int = REFERABLE_MIN_GRADE, dme: bool = False
) -> ReferralReason:
    """Why an eye is referred: its grade, else its risk at the operating point, else macular oedema alone.

    The grade is the model's own estimate and is never rewritten to agree with the referral: an eye whose most
    likely grade is 0-1 but whose calibrated P(referable) reaches the threshold is referred for its *risk*,
    and says so, instead of being reported as moderate DR it was not seen to have. ``dme`` is the reason only
    when oedema alone triggered the referral (its own flag is in the answer either way).
    """
    if grade >= min_grade:
        return "grade"
    if p_referable >= threshold:
        return "risk"
    return "dme" if dme else "none"


def grade_rule(probs: np.ndarray, regression: np.ndarray | float, decision: Decision) -> np.ndarray:
    """The grade a decision rule reads from calibrated probabilities (N x 5 or 5) and the regression output."""
    probs = np.asarray(probs, dtype=np.float64)
    if decision.rule == "argmax":
        return np.asarray(np.argmax(probs, axis=-1))
    if decision.rule == "expected_grade":
        score = probs @ np.arange(probs.shape[-1], dtype=np.float64)
    else:
        score = np.asarray(regression, dtype=np.float64)
    return grade_from_score(score, decision.thresholds)


@dataclass(frozen=True)
class GradeDecision:
    """The model's answer for one gradable fundus.

    Attributes:
        grade: ICDR grade 0-4, as the spec's grade rule reads the calibrated probabilities.
        grade_name: its name.
        referable: referred: the grade is referable (2, moderate NPDR, or worse) or the risk reached the
            operating point's threshold.
        referral_reason: ``grade``, ``risk`` (grade 0-1, P(referable) at or over the threshold) or ``none``.
        probabilities: calibrated P(grade = k), k = 0..4.
        p_referable: calibrated P(grade >= 2): the estimated risk of referable DR.
        confidence: calibrated probability of the reported grade (never a statement about the referral, which
            at a screening operating point is made on risks well below one half).
        operating_point: the name of the operating point the referral was decided at.
        referable_threshold: that point's risk threshold.
        p_dme: calibrated probability of diabetic macular oedema (None: the model has no DME output).
        dme: oedema at the DME rule's own threshold (None without a DME output).
        urgency: how soon to refer (:func:`~retinagrade.referral.urgency_of_grade`), so that every door
            shows the same clinical rule.
    """

    grade: int
    grade_name: str
    referable: bool
    referral_reason: ReferralReason
    probabilities: tuple[float, ...]
    p_referable: float
    confidence: float
    operating_point: str
    referable_threshold: float
    urgency: Urgency
    p_dme: float | None = None
    dme: bool | None = None


def decide_grade(
    logits: np.ndarray, regression: float, spec: ModelSpec, dme_logit: float | None = None
) -> GradeDecision:
    """Apply the spec's calibration, grade rule, operating point and DME rule to one image's outputs."""
    probs = softmax(logits, spec.temperature)
    min_grade = spec.referable_min_grade
    p_referable = float(probs[min_grade:].sum())
    grade = int(grade_rule(probs, float(regression), spec.decision))
    p_dme = spec.dme.probability(dme_logit) if spec.dme is not None and dme_logit is not None else None
    dme = None if p_dme is None or spec.dme is None else p_dme >= spec.dme.threshold
    reason = referral_reason(grade, p_referable, spec.referable_threshold, min_grade, bool(dme))
    referable = reason != "none"
    return GradeDecision(
        grade=grade,
        grade_name=GRADE_NAMES[grade],
        referable=referable,
        referral_reason=reason,
        probabilities=tuple(float(p) for p in probs),
        p_referable=p_referable,
        confidence=float(probs[grade]),
        operating_point=spec.operating_point,
        referable_threshold=float(spec.referable_threshold),
        urgency=urgency_of_grade(grade, referable),
        p_dme=p_dme,
        dme=dme,
    )
