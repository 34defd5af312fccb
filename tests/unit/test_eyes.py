"""Both eyes of a patient: names that say which eye, and the fellow-eye rule that never changes a single answer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retinagrade.eyes import eye_from_name, fuse_logits, paired_answers
from retinagrade.inference.model_spec import FellowEyeRule, ModelSpec
from retinagrade.inference.postprocess import decide_grade
from retinagrade.pipeline import DEFAULT_MODEL


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("1000_left", ("1000", "left")),
        ("1000_RIGHT", ("1000", "right")),
        ("p7-L", ("p7", "left")),
        ("p7_r", ("p7", "right")),
        ("1221_OD_f_2", ("1221", "right")),
        ("1221_OS", ("1221", "left")),
        ("1221_OI_f_3", ("1221", "left")),  # ojo izquierdo
        ("smith_john_left_2", ("smith_john", "left")),  # the first eye token after a patient part
        ("retina", None),
        ("left", None),  # no patient part
        ("scan_lr", None),
    ],
)
def test_eye_from_name(stem: str, expected: tuple[str, str] | None) -> None:
    assert eye_from_name(stem) == expected


def test_fuse_logits_keeps_an_eye_without_a_fellow() -> None:
    own = np.array([2.0, 0.5, -1.0, -2.0, -3.0])
    assert np.array_equal(fuse_logits(own, np.zeros((0, 5)), 0.4), own)
    fellow = np.array([[-2.0, 0.0, 2.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 1.0, 2.0]])
    np.testing.assert_allclose(fuse_logits(own, fellow, 0.25), 0.75 * own + 0.25 * fellow.mean(axis=0))


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    base = ModelSpec.load(DEFAULT_MODEL, verify_checksum=False)
    return dataclasses.replace(base, fellow_eye=FellowEyeRule(weight=0.4, referable_threshold=0.35))


def test_paired_answers_come_from_fused_outputs_at_the_fellow_eye_operating_point(spec: ModelSpec) -> None:
    healthy = (np.array([3.0, 0.0, -2.0, -3.0, -4.0]), 0.1)
    diseased = (np.array([-2.0, -1.0, 2.5, 1.0, 0.0]), 2.2)
    items = [
        ("a", ("p1", "left"), healthy),
        ("b", ("p1", "right"), diseased),
        ("c", ("p2", "left"), healthy),  # no fellow eye
        ("d", None, diseased),  # untagged
        ("e", ("p1", "left"), None),  # not graded
    ]
    answers = paired_answers(items, spec)
    assert set(answers) == {"a", "b"}
    assert answers["a"].fellows == ("b",) and answers["b"].fellows == ("a",)
    rule = spec.fellow_eye
    assert rule is not None
    expected = decide_grade(
        0.6 * healthy[0] + 0.4 * diseased[0],
        0.6 * healthy[1] + 0.4 * diseased[1],
        dataclasses.replace(spec, referable_threshold=rule.referable_threshold, operating_point="fellow-eye"),
    )
    assert answers["a"].decision == expected
    assert answers["a"].decision.operating_point == "fellow-eye"
    # The fused answer moves toward the other eye: the healthy eye's P(referable) rises.
    assert answers["a"].decision.p_referable > decide_grade(healthy[0], healthy[1], spec).p_referable


def test_no_rule_no_paired_answers(spec: ModelSpec) -> None:
    items = [("a", ("p1", "left"), (np.zeros(5), 0.0)), ("b", ("p1", "right"), (np.ones(5), 1.0))]
    assert paired_answers(items, dataclasses.replace(spec, fellow_eye=None)) == {}


def test_the_rule_round_trips_through_the_spec(spec: ModelSpec) -> None:
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.fellow_eye == spec.fellow_eye
    broken = spec.to_dict()
    broken["fellow_eye"] = {"weight": 1.5, "referable_threshold": 0.3}
    with pytest.raises(Exception, match="fellow_eye"):
        ModelSpec.from_dict(broken)
