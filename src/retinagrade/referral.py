"""What to do next: the recommendation for one image, and the referral decision for a patient from both eyes.

These are clinical rules, so they live here, in the domain, and every door shows what they say: the page, the
API, the CLI's report and the audit trail cannot disagree. Plain data in and out (no FastAPI, no pipeline).

For one image: grade 4 (proliferative DR) is an urgent referral, any other referable grade a referral, the
rest a routine rescreen; an image that could not be graded asks for a new photograph or a manual grading.

For a patient: refer when any image of either eye is referable (urgently when any of them is urgent).
Otherwise the decision is "no referral" only when both eyes were graded; an ungradable, non-fundus or
unreadable image, or an eye that was not sent (or not tagged), leaves it undecided, because the unseen eye
could be the referable one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Final, Literal

from retinagrade.constants import URGENT_MIN_GRADE, Status

#: How soon the person must be seen. ``retake``: no grade, the photograph must be taken (or read) again.
Urgency = Literal["urgent", "refer", "routine", "retake"]
#: The recommended next step, a stable code that each door puts in words.
Action = Literal[
    "refer_urgently", "refer", "rescreen", "rephotograph_or_grade_manually", "send_fundus_photo", "resend_file"
]
Eye = Literal["left", "right"]
ReferralDecision = Literal["refer", "no_refer", "cannot_decide"]
EyeStatus = Literal["referable", "not_referable", "not_graded"]

_ORDER: Final[dict[Urgency, int]] = {"routine": 0, "retake": 1, "refer": 2, "urgent": 3}
_GRADED_ACTION: Final[dict[Urgency, Action]] = {"urgent": "refer_urgently", "refer": "refer", "routine": "rescreen"}
_NOT_GRADED_ACTION: Final[dict[Status, Action]] = {
    "ungradable": "rephotograph_or_grade_manually",
    "not_fundus": "send_fundus_photo",
    "error": "resend_file",
}


def urgency_of_grade(grade: int, referable: bool) -> Urgency:
    """The urgency of a graded eye; ``referable`` is the decision at the validated operating point."""
    if grade >= URGENT_MIN_GRADE:
        return "urgent"
    return "refer" if referable else "routine"


@dataclass(frozen=True)
class Recommendation:
    """What to do about one image."""

    urgency: Urgency
    action: Action


def recommend(status: Status, urgency: Urgency | None) -> Recommendation:
    """The recommendation for a result: from the decision's urgency when graded, else from the status."""
    if status == "graded" and urgency is not None:
        return Recommendation(urgency, _GRADED_ACTION[urgency])
    return Recommendation("retake", _NOT_GRADED_ACTION.get(status, "resend_file"))


@dataclass(frozen=True)
class TaggedOutcome:
    """One image of a batch as the referral rule sees it.

    Attributes:
        index: its place in the batch.
        patient_id: whose it is.
        eye: which eye, when tagged.
        referable: the decision; None when it was not graded.
        urgency: the decision's urgency; None when it was not graded.
    """

    index: int
    patient_id: str
    eye: Eye | None
    referable: bool | None
    urgency: Urgency | None = None


@dataclass(frozen=True)
class EyeSummary:
    """The images of one eye (or of untagged images, ``eye`` None) and what they say together."""

    eye: Eye | None
    images: tuple[int, ...]
    status: EyeStatus


@dataclass(frozen=True)
class PatientReferral:
    """The decision for one patient, with the reason in words and the eyes it was made from.

    ``urgency`` is the most urgent of the patient's graded images when the decision is ``refer``, ``routine``
    for ``no_refer`` and None while undecided.
    """

    patient_id: str
    decision: ReferralDecision
    reason: str
    eyes: tuple[EyeSummary, ...]
    urgency: Urgency | None


def _most_urgent(urgencies: list[Urgency]) -> Urgency:
    best: Urgency = "refer"
    for urgency in urgencies:
        best = urgency if _ORDER[urgency] > _ORDER[best] else best
    return best


def _eye_status(outcomes: list[TaggedOutcome]) -> EyeStatus:
    if any(o.referable for o in outcomes):
        return "referable"
    if any(o.referable is False for o in outcomes):
        return "not_referable"
    return "not_graded"


def _decide(images: list[TaggedOutcome], by_eye: dict[Eye | None, list[TaggedOutcome]]) -> tuple[ReferralDecision, str]:
    missing = [eye for eye in ("left", "right") if eye not in by_eye]
    if any(o.referable for o in images):
        return "refer", "at least one eye is referable"
    if any(o.referable is None for o in images):
        return "cannot_decide", "an image could not be graded and no eye is referable"
    if missing:
        return "cannot_decide", f"no graded image tagged as the {' and '.join(missing)} eye"
    return "no_refer", "both eyes graded, neither referable"


def patient_referrals(outcomes: list[TaggedOutcome]) -> list[PatientReferral]:
    """One decision per patient id, in order of first appearance."""
    by_patient: dict[str, list[TaggedOutcome]] = defaultdict(list)
    for outcome in outcomes:
        by_patient[outcome.patient_id].append(outcome)
    referrals = []
    for patient_id, images in by_patient.items():
        by_eye: dict[Eye | None, list[TaggedOutcome]] = defaultdict(list)
        for image in images:
            by_eye[image.eye].append(image)
        eyes = tuple(
            EyeSummary(eye=eye, images=tuple(o.index for o in found), status=_eye_status(found))
            for eye, found in by_eye.items()
        )
        decision, reason = _decide(images, by_eye)
        urgency: Urgency | None = None
        if decision == "refer":
            urgency = _most_urgent([o.urgency for o in images if o.referable and o.urgency is not None])
        elif decision == "no_refer":
            urgency = "routine"
        referrals.append(PatientReferral(patient_id, decision, reason, eyes, urgency))
    return referrals
