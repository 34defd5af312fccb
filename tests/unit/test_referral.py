"""What to do next, for an image and for a patient: the domain's rule that every door shows."""

from __future__ import annotations

import pytest

from retinagrade.referral import TaggedOutcome, patient_referrals, recommend, urgency_of_grade


@pytest.mark.parametrize(
    ("grade", "referable", "urgency"),
    [
        (0, False, "routine"),
        (1, False, "routine"),
        (1, True, "refer"),
        (2, True, "refer"),
        (3, True, "refer"),
        (4, True, "urgent"),
    ],
)
def test_urgency_of_a_graded_eye(grade: int, referable: bool, urgency: str) -> None:
    assert urgency_of_grade(grade, referable) == urgency


def test_recommendations_for_every_status() -> None:
    assert recommend("graded", "urgent").action == "refer_urgently"
    assert recommend("graded", "routine").action == "rescreen"
    assert recommend("ungradable", None) == recommend("ungradable", None)
    assert recommend("ungradable", None).action == "rephotograph_or_grade_manually"
    assert recommend("not_fundus", None).urgency == "retake"
    assert recommend("error", None).action == "resend_file"


def test_a_patient_with_an_urgent_eye_is_referred_urgently() -> None:
    (referral,) = patient_referrals(
        [TaggedOutcome(0, "p", "left", True, "refer"), TaggedOutcome(1, "p", "right", True, "urgent")]
    )
    assert (referral.decision, referral.urgency) == ("refer", "urgent")


def test_patient_urgency_follows_the_decision() -> None:
    refer, rescreen, undecided = patient_referrals(
        [
            TaggedOutcome(0, "a", "left", True, "refer"),
            TaggedOutcome(1, "a", "right", None),
            TaggedOutcome(2, "b", "left", False, "routine"),
            TaggedOutcome(3, "b", "right", False, "routine"),
            TaggedOutcome(4, "c", "left", False, "routine"),
        ]
    )
    assert (refer.decision, refer.urgency) == ("refer", "refer")
    assert (rescreen.decision, rescreen.urgency) == ("no_refer", "routine")
    assert (undecided.decision, undecided.urgency) == ("cannot_decide", None)
    assert [e.images for e in refer.eyes] == [(0,), (1,)]
