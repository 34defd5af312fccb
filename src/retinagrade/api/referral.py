"""The per-patient referral decision from the results of both eyes (no FastAPI here: plain data in and out).

A patient is referred when any image of either eye is referable. Otherwise the decision is "no referral" only
when both eyes were graded; an ungradable, non-fundus or unreadable image, or an eye that was not sent (or
not tagged), leaves it undecided, because the unseen eye could be the referable one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from retinagrade.api.schemas import Eye, EyeStatus, EyeSummary, PatientReferral, ReferralDecision


@dataclass(frozen=True)
class TaggedOutcome:
    """One image of a batch as the referral rule sees it. ``referable`` is None when it was not graded."""

    index: int
    patient_id: str
    eye: Eye | None
    referable: bool | None


def _eye_status(outcomes: list[TaggedOutcome]) -> EyeStatus:
    if any(o.referable for o in outcomes):
        return "referable"
    if any(o.referable is False for o in outcomes):
        return "not_referable"
    return "not_graded"


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
        eyes = [
            EyeSummary(eye=eye, images=[o.index for o in found], status=_eye_status(found))
            for eye, found in by_eye.items()
        ]
        referable = [e for e in eyes if e.status == "referable"]
        missing = [eye for eye in ("left", "right") if eye not in by_eye]
        decision: ReferralDecision
        if referable:
            decision, reason = "refer", "at least one eye is referable"
        elif any(o.referable is None for o in images):
            decision, reason = "cannot_decide", "an image could not be graded and no eye is referable"
        elif missing:
            decision = "cannot_decide"
            reason = f"no graded image tagged as the {' and '.join(missing)} eye"
        else:
            decision, reason = "no_refer", "both eyes graded, neither referable"
        referrals.append(
            PatientReferral(
                patient_id=patient_id,
                decision=decision,
                reason=reason,
                eyes=eyes,
            )
        )
    return referrals
