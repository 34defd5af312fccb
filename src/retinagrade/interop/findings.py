"""One eye's result as the hospital formats (DICOM SR, FHIR) code it, and the codes both use.

Where a published terminology defines a concept it is used (sources in docs/integration.md):

- the ICDR severity as LOINC 71491-5 / 71490-7 ("Right/Left eye Diabetic retinopathy severity level") with
  the answers of LOINC answer list LL2117-1 (LA18643-9 no apparent retinopathy ... LA18648-8 proliferative);
- the eye as SNOMED CT 362502000 "Entire right eye" / 362503005 "Entire left eye" (HL7 Eyecare target-site
  value set), yes/no as SNOMED CT 373066001 / 373067005 (DICOM CID 230);
- the algorithm as DICOM TID 4019 (DCM 111001 Algorithm Name, 111003 Algorithm Version);
- diabetic macular oedema as SNOMED CT 312912001 "Macular edema due to diabetes mellitus" (a disorder concept,
  used as the finding that is present or absent, as FHIR eye-care profiles do), with P(DME) as a local code.

Concepts no terminology defines (referable at this model's operating point, the gate's gradability and its
reasons, P(referable)) carry retinagrade's own codes, in the private coding scheme ``99RETINAGRADE`` (DICOM)
and the code system :data:`RETINAGRADE_SYSTEM` (FHIR).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from retinagrade.constants import GRADE_NAMES
from retinagrade.errors import RetinagradeError

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
RETINAGRADE_SYSTEM: Final = "urn:retinagrade:codes"
RETINAGRADE_SCHEME: Final = "99RETINAGRADE"

Eye = Literal["R", "L"]


@dataclass(frozen=True)
class Concept:
    """A coded concept: ``system`` is the FHIR URI, ``scheme`` the DICOM coding scheme designator."""

    code: str
    display: str
    system: str
    scheme: str


def loinc(code: str, display: str) -> Concept:
    return Concept(code, display, LOINC, "LN")


def snomed(code: str, display: str) -> Concept:
    return Concept(code, display, SNOMED, "SCT")


def local(code: str, display: str) -> Concept:
    return Concept(code, display, RETINAGRADE_SYSTEM, RETINAGRADE_SCHEME)


#: LOINC answer list LL2117-1, indexed by ICDR grade 0-4.
ICDR_ANSWERS: Final[tuple[Concept, ...]] = (
    loinc("LA18643-9", "No apparent retinopathy"),
    loinc("LA18644-7", "Mild non-proliferative retinopathy"),
    loinc("LA18645-4", "Moderate non-proliferative retinopathy"),
    loinc("LA18646-2", "Severe non-proliferative retinopathy"),
    loinc("LA18648-8", "Proliferative retinopathy"),
)
assert len(ICDR_ANSWERS) == len(GRADE_NAMES)

SEVERITY: Final[Mapping[Eye | None, Concept]] = {
    "R": loinc("71491-5", "Right eye Diabetic retinopathy severity level"),
    "L": loinc("71490-7", "Left eye Diabetic retinopathy severity level"),
    # No LOINC code names the severity of an eye of unknown side.
    None: local("dr-severity", "Diabetic retinopathy severity level (ICDR), eye not stated"),
}
EYE_SITE: Final[Mapping[Eye, Concept]] = {
    "R": snomed("362502000", "Entire right eye"),
    "L": snomed("362503005", "Entire left eye"),
}
YES: Final = snomed("373066001", "Yes")
NO: Final = snomed("373067005", "No")

# Code meanings are at most 64 characters (DICOM LO).
REFERABLE: Final = local("referable-dr", "Referable diabetic retinopathy (grade, or risk at the threshold)")
REFERRAL_REASON: Final = local("referral-reason", "Reason for the referral decision")
DME: Final = snomed("312912001", "Macular edema due to diabetes mellitus")
P_DME: Final = local("p-dme", "Probability of diabetic macular oedema")
#: The values of :data:`REFERRAL_REASON`, by ``referral_reason``.
REFERRAL_REASONS: Final[Mapping[str, Concept]] = {
    "grade": local("refer-grade", "Referred for its grade (moderate NPDR or worse)"),
    "risk": local("refer-risk", "Mild or no DR seen; referred for the risk of referable DR"),
    "dme": local("refer-dme", "Referred for diabetic macular oedema"),
    "none": local("not-referred", "Not referred"),
}
OPERATING_POINT: Final = local("op-point", "Operating point of the referral decision")
REFERABLE_THRESHOLD: Final = local("risk-threshold", "Risk threshold of the operating point")
P_REFERABLE: Final = local("p-referable-dr", "Probability of referable diabetic retinopathy")
GRADABLE: Final = local("gradable", "Photograph gradable")
QUALITY_SCORE: Final = local("quality-score", "Photograph gradability score")
NOT_GRADED_REASON: Final = local("ungraded-reason", "Reason the photograph was not graded")
PROCEDURE: Final = local("dr-photo-grading", "Automated diabetic retinopathy grading of a fundus photograph")
REPORT_TITLE: Final = local("dr-report", "Diabetic retinopathy screening report (automated)")


def reason_concept(code: str) -> Concept:
    """A gate reason (``too_dark``...) or error code (``multi_frame_not_supported``...) as a local concept."""
    return local(code, code.replace("_", " "))


@dataclass(frozen=True)
class AlgorithmInfo:
    """The software that produced a finding (DICOM TID 4019, FHIR Device)."""

    name: str
    version: str
    model_sha256: str
    intended_use: str = ""
    site_profile: str = ""


@dataclass(frozen=True)
class EyeFinding:
    """One photograph's outcome, flattened for coding.

    ``status`` is ``graded``, ``ungradable``, ``not_fundus`` or ``error``; grade fields are set only when
    graded, ``reasons`` (gate reasons, or the error code) only when not.
    """

    status: str
    laterality: Eye | None
    grade: int | None = None
    referable: bool | None = None
    referral_reason: str | None = None
    operating_point: str = ""
    referable_threshold: float | None = None
    p_referable: float | None = None
    p_dme: float | None = None
    dme: bool | None = None
    probabilities: tuple[float, ...] = ()
    quality_score: float | None = None
    gradable: bool = False
    reasons: tuple[str, ...] = ()
    message: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def grade_name(self) -> str | None:
        return GRADE_NAMES[self.grade] if self.grade is not None else None

    @property
    def referral_sentence(self) -> str:
        """The referral decision and its reason in one sentence, the same in the page, the SR and FHIR."""
        return referral_sentence(
            self.grade, self.referral_reason, self.p_referable, self.referable_threshold, self.operating_point
        )


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def referral_sentence(
    grade: int | None,
    reason: str | None,
    p_referable: float | None,
    threshold: float | None,
    operating_point: str = "",
) -> str:
    """What the referral decision says, and why, for a graded eye ("" when not graded).

    A grade 0-1 eye referred for its risk says so in words, so nobody reads it as moderate DR.
    """
    if grade is None or reason is None:
        return ""
    name = GRADE_NAMES[grade]
    point = f" at operating point '{operating_point}'" if operating_point else ""
    risk = "" if p_referable is None else _percent(p_referable)
    line = "" if threshold is None else _percent(threshold)
    if reason == "grade":
        return f"ICDR grade {grade} ({name}): refer." + (f" Estimated risk of referable DR {risk}." if risk else "")
    if reason == "dme":
        return (
            f"ICDR grade {grade} ({name}); referred for diabetic macular oedema (its estimated probability "
            "shown with the oedema finding)."
        )
    if reason == "risk":
        return (
            f"Mild or no DR seen (ICDR grade {grade}, {name}); referred because the estimated risk of referable DR "
            f"is {risk} (refers at {line} or more{point})."
        )
    return f"ICDR grade {grade} ({name}): no referral; estimated risk of referable DR {risk}" + (
        f" (below {line}{point})." if line else "."
    )


def eye_of(metadata: Mapping[str, str]) -> Eye | None:
    side = metadata.get("ImageLaterality", "")
    return side if side in ("R", "L") else None  # type: ignore[return-value]


def finding_from(outcome: object, metadata: Mapping[str, str] | None = None) -> EyeFinding:
    """An :class:`EyeFinding` from a :class:`~retinagrade.pipeline.GradeResult` or a RetinagradeError.

    Args:
        outcome: what the pipeline gave for one image.
        metadata: the image's DICOM identifiers (``DecodedImage.metadata``); taken from the result when it
            carries them itself.
    """
    from retinagrade.pipeline import GradeResult

    meta: Mapping[str, str] = metadata if metadata is not None else getattr(outcome, "metadata", None) or {}
    side = eye_of(meta)
    if isinstance(outcome, RetinagradeError):
        return EyeFinding("error", side, reasons=(outcome.code,), message=outcome.message, metadata=meta)
    if not isinstance(outcome, GradeResult):
        raise TypeError(f"expected a GradeResult or RetinagradeError, got {type(outcome).__name__}")
    quality = outcome.quality
    decision = outcome.decision
    if outcome.status != "graded" or decision is None:
        return EyeFinding(
            outcome.status,
            side,
            quality_score=quality.score,
            gradable=False,
            reasons=quality.reasons,
            metadata=meta,
        )
    return EyeFinding(
        "graded",
        side,
        grade=decision.grade,
        referable=decision.referable,
        referral_reason=decision.referral_reason,
        operating_point=decision.operating_point,
        referable_threshold=decision.referable_threshold,
        p_referable=decision.p_referable,
        p_dme=decision.p_dme,
        dme=decision.dme,
        probabilities=decision.probabilities,
        quality_score=quality.score,
        gradable=True,
        metadata=meta,
    )


class RecordLike(Protocol):
    """The fields of :class:`retinagrade.report.ResultRecord` a finding is made of (read-only)."""

    @property
    def image(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def grade(self) -> int | None: ...

    @property
    def referable(self) -> bool | None: ...

    @property
    def referral_reason(self) -> str | None: ...

    @property
    def operating_point(self) -> str: ...

    @property
    def referable_threshold(self) -> float | None: ...

    @property
    def p_dme(self) -> float | None: ...

    @property
    def dme(self) -> bool | None: ...

    @property
    def p_referable(self) -> float | None: ...

    @property
    def probabilities(self) -> tuple[float, ...]: ...

    @property
    def quality(self) -> float | None: ...

    @property
    def gradable(self) -> bool | None: ...

    @property
    def reasons(self) -> tuple[str, ...]: ...

    @property
    def error_code(self) -> str: ...

    @property
    def error_message(self) -> str: ...

    @property
    def site(self) -> str: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...


def finding_from_record(record: RecordLike) -> EyeFinding:
    """An :class:`EyeFinding` from a result record (the rows every report writer receives)."""
    meta = dict(record.metadata)
    if record.status == "error":
        return EyeFinding(
            "error", eye_of(meta), reasons=(record.error_code,), message=record.error_message, metadata=meta
        )
    return EyeFinding(
        record.status,
        eye_of(meta),
        grade=record.grade,
        referable=record.referable,
        referral_reason=record.referral_reason,
        operating_point=record.operating_point,
        referable_threshold=record.referable_threshold,
        p_referable=record.p_referable,
        p_dme=record.p_dme,
        dme=record.dme,
        probabilities=tuple(record.probabilities),
        quality_score=record.quality,
        gradable=bool(record.gradable) and record.status == "graded",
        reasons=tuple(record.reasons),
        metadata=meta,
    )
