"""Decision rules: calibration, thresholds, and a grade that never contradicts the referral."""

from __future__ import annotations

import numpy as np

from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.inference.postprocess import consistent_grade, decide_grade, softmax
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


def test_argmax_rule_and_confidence() -> None:
    result = decide_grade(np.log(np.array([0.05, 0.05, 0.7, 0.1, 0.1])), 2.0, _spec())
    assert result.grade == 2 and result.referable
    assert np.isclose(result.p_referable, 0.9)
    assert np.isclose(result.confidence, 0.9)
    assert np.isclose(sum(result.probabilities), 1.0)


def test_regression_rule_uses_thresholds() -> None:
    probs = np.log(np.array([0.2, 0.2, 0.2, 0.2, 0.2]))
    spec = _spec("regression", (0.7, 1.6, 2.4, 3.1), referable_threshold=0.5)
    assert decide_grade(probs, 3.2, spec).grade == 4
    assert decide_grade(probs, 0.69, _spec("regression", (0.7, 1.6, 2.4, 3.1), referable_threshold=0.7)).grade == 0


def test_grade_follows_referral_decision() -> None:
    probs = np.array([0.3, 0.35, 0.2, 0.1, 0.05])
    assert consistent_grade(1, True, probs) == 2
    assert consistent_grade(3, False, probs) == 1
    assert consistent_grade(3, True, probs) == 3
    # a low operating point refers an eye whose most likely grade is 1
    result = decide_grade(np.log(probs), 1.0, _spec(referable_threshold=0.3))
    assert result.referable and result.grade >= 2


def test_a_referred_healthy_looking_eye_is_moderate_not_proliferative() -> None:
    # Above the line the probabilities are small and flat, grade 4 the largest of them: the eye is referred
    # (a sensitive operating point) at the nearest referable grade, never as urgent proliferative DR.
    probs = np.array([0.83, 0.04, 0.04, 0.04, 0.05])
    assert consistent_grade(0, True, probs) == 2
    result = decide_grade(np.log(probs), 0.1, _spec(referable_threshold=0.1))
    assert result.referable and result.grade == 2 and result.urgency == "refer"
