"""Decision rules: calibration, the grade rule, and the referral with its reason at a named operating point."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import pytest

from retinagrade.errors import UnknownOperatingPointError
from retinagrade.inference.model_spec import Decision, DmeRule, ModelSpec, OperatingPoint
from retinagrade.inference.postprocess import decide_grade, referral_reason, softmax
from retinagrade.preprocessing.pipeline import PreprocessConfig


def _spec(
    rule: str = "argmax", thresholds=(0.5, 1.5, 2.5, 3.5), temperature: float = 1.0, referable_threshold: float = 0.5
) -> ModelSpec:
    return ModelSpec(
        name="t",
        version="0",
        model_file="t.onnx",
        sha256="",
        preprocess=PreprocessConfig(),
        temperature=temperature,
        decision=Decision(rule, tuple(thresholds)),
        referable_threshold=referable_threshold,
    )


def test_softmax_temperature_flattens() -> None:
    logits = np.array([2.0, 0.0, 0.0, 0.0, 0.0])
    assert softmax(logits, 2.0)[0] < softmax(logits, 1.0)[0]
    assert np.isclose(softmax(logits, 3.0).sum(), 1.0)


def test_argmax_rule_and_confidence_is_the_probability_of_the_grade() -> None:
    result = decide_grade(np.log(np.array([0.05, 0.05, 0.7, 0.1, 0.1])), 2.0, _spec())
    assert result.grade == 2 and result.referable and result.referral_reason == "grade"
    assert np.isclose(result.p_referable, 0.9)
    assert np.isclose(result.confidence, 0.7)
    assert np.isclose(sum(result.probabilities), 1.0)


def test_regression_rule_uses_thresholds() -> None:
    probs = np.log(np.array([0.2, 0.2, 0.2, 0.2, 0.2]))
    spec = _spec("regression", (0.7, 1.6, 2.4, 3.1), referable_threshold=0.5)
    assert decide_grade(probs, 3.2, spec).grade == 4
    assert decide_grade(probs, 0.69, _spec("regression", (0.7, 1.6, 2.4, 3.1), referable_threshold=0.7)).grade == 0


def test_an_eye_referred_for_its_risk_keeps_the_grade_the_model_believes() -> None:
    # A low operating point refers an eye whose most likely grade is 1: the grade stays 1, the reason is risk.
    probs = np.array([0.3, 0.35, 0.2, 0.1, 0.05])
    result = decide_grade(np.log(probs), 1.0, _spec(referable_threshold=0.3))
    assert result.grade == 1 and result.grade_name == "mild NPDR"
    assert result.referable and result.referral_reason == "risk" and result.urgency == "refer"
    assert result.operating_point == "default" and result.referable_threshold == 0.3
    # The number called confidence speaks of the grade shown, not of the referral beside it.
    assert np.isclose(result.confidence, 0.35)


def test_a_referred_healthy_looking_eye_is_never_reported_as_moderate_or_proliferative() -> None:
    # Above the line the probabilities are small and flat: 0.2.0 printed such eyes as grade 2 (or 4, urgent).
    probs = np.array([0.83, 0.04, 0.04, 0.04, 0.05])
    result = decide_grade(np.log(probs), 0.1, _spec(referable_threshold=0.1))
    assert result.referable and result.referral_reason == "risk"
    assert result.grade == 0 and result.urgency == "refer"


def test_a_referable_grade_refers_whatever_the_threshold_and_below_it_nothing_refers() -> None:
    probs = np.array([0.05, 0.15, 0.41, 0.3, 0.09])
    assert decide_grade(np.log(probs), 2.0, _spec(referable_threshold=0.95)).referral_reason == "grade"
    healthy = decide_grade(np.log(np.array([0.9, 0.06, 0.02, 0.01, 0.01])), 0.0, _spec(referable_threshold=0.5))
    assert not healthy.referable and healthy.referral_reason == "none" and healthy.urgency == "routine"


def test_referral_reason_is_grade_then_risk_then_none() -> None:
    assert referral_reason(3, 0.01, 0.5) == "grade"
    assert referral_reason(1, 0.5, 0.5) == "risk"
    assert referral_reason(1, 0.49, 0.5) == "none"


def test_a_named_operating_point_changes_only_the_threshold_and_names_itself() -> None:
    spec = dataclasses.replace(
        _spec(referable_threshold=0.4),
        operating_point="balanced",
        operating_points=MappingProxyType(
            {"balanced": OperatingPoint("balanced", 0.4), "sensitive": OperatingPoint("sensitive", 0.1)}
        ),
    )
    probs = np.log(np.array([0.7, 0.1, 0.1, 0.05, 0.05]))
    assert decide_grade(probs, 0.0, spec).referral_reason == "none"
    sensitive = decide_grade(probs, 0.0, spec.with_operating_point("sensitive"))
    assert sensitive.referral_reason == "risk" and sensitive.operating_point == "sensitive"
    assert sensitive.grade == 0
    with pytest.raises(UnknownOperatingPointError):
        spec.with_operating_point("lenient")


def test_oedema_refers_an_eye_on_its_own_and_says_so() -> None:
    spec = dataclasses.replace(_spec(referable_threshold=0.5), dme=DmeRule(scale=1.0, bias=0.0, threshold=0.6))
    healthy = np.log(np.array([0.8, 0.15, 0.03, 0.01, 0.01]))
    oedema = decide_grade(healthy, 0.1, spec, dme_logit=2.0)  # p_dme = sigmoid(2) = 0.88
    assert oedema.dme is True and np.isclose(oedema.p_dme, 1 / (1 + np.exp(-2.0)))
    assert oedema.referable and oedema.referral_reason == "dme" and oedema.grade == 0
    calm = decide_grade(healthy, 0.1, spec, dme_logit=-1.0)
    assert calm.dme is False and not calm.referable and calm.referral_reason == "none"
    # a referable grade is the reason whatever the oedema; a model without a DME output says nothing of it
    assert decide_grade(np.log(np.array([0.05, 0.05, 0.8, 0.05, 0.05])), 2.0, spec, 2.0).referral_reason == "grade"
    plain = decide_grade(healthy, 0.1, _spec(), dme_logit=2.0)
    assert plain.p_dme is None and plain.dme is None
