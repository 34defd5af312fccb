"""From model outputs to a grade: calibration, decision rule, referral, confidence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinagrade.constants import GRADE_NAMES, REFERABLE_MIN_GRADE
from retinagrade.inference.model_spec import ModelSpec
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


def consistent_grade(grade: int, referable: bool, probs: np.ndarray, min_grade: int = REFERABLE_MIN_GRADE) -> int:
    """Make the grade agree with the referral decision, which is set at the validated operating point.

    A referable eye reported as grade 0-1 (or the reverse) would contradict itself; the referral decision
    wins. An eye referred although its grade rule said 0-1 becomes ``min_grade`` (moderate NPDR), the nearest
    referable grade: at a sensitive operating point its probabilities above the line are small and nearly
    flat, and their argmax would report healthy-looking eyes as proliferative and urgent (31 of 483 healthy
    eyepacs-768 eyes on leave-one-source-out predictions, against 3 with the nearest grade). An eye not
    referred although its grade rule said 2+ becomes the most probable grade below the line.
    """
    if referable and grade < min_grade:
        return min_grade
    if not referable and grade >= min_grade:
        return int(np.argmax(probs[:min_grade]))
    return grade


@dataclass(frozen=True)
class GradeDecision:
    """The model's answer for one gradable fundus.

    Attributes:
        grade: ICDR grade 0-4.
        grade_name: its name.
        referable: the spec's referable grade (2, moderate NPDR) or worse at the validated operating point.
        probabilities: calibrated P(grade = k), k = 0..4.
        p_referable: calibrated P(grade >= 2).
        confidence: calibrated probability that the reported referral decision is right.
        urgency: how soon to refer (:func:`~retinagrade.referral.urgency_of_grade`), so that every door
            shows the same clinical rule.
    """

    grade: int
    grade_name: str
    referable: bool
    probabilities: tuple[float, ...]
    p_referable: float
    confidence: float
    urgency: Urgency


def decide_grade(logits: np.ndarray, regression: float, spec: ModelSpec) -> GradeDecision:
    """Apply the spec's calibration, decision rule and referable operating point to one image's outputs."""
    probs = softmax(logits, spec.temperature)
    min_grade = spec.referable_min_grade
    p_referable = float(probs[min_grade:].sum())
    rule = spec.decision.rule
    if rule == "argmax":
        raw = int(np.argmax(probs))
    else:
        score = float(probs @ np.arange(len(probs))) if rule == "expected_grade" else float(regression)
        raw = int(grade_from_score(score, spec.decision.thresholds))
    referable = p_referable >= spec.referable_threshold
    grade = consistent_grade(raw, referable, probs, min_grade)
    confidence = p_referable if referable else 1.0 - p_referable
    return GradeDecision(
        grade=grade,
        grade_name=GRADE_NAMES[grade],
        referable=bool(referable),
        probabilities=tuple(float(p) for p in probs),
        p_referable=p_referable,
        confidence=float(confidence),
        urgency=urgency_of_grade(grade, bool(referable)),
    )
