"""Response bodies of the service (requests are images, read in :mod:`retinagrade.api.uploads`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from retinagrade.constants import NUM_GRADES, ReferralReason
from retinagrade.referral import Action, EyeStatus, ReferralDecision, Urgency
from retinagrade.referral import Eye as Eye  # re-exported: uploads and routes name eyes from here

ResultStatus = Literal["graded", "ungradable", "not_fundus"]


class ErrorBody(BaseModel):
    """Every error answer: a stable machine-readable ``code`` and a message for people."""

    code: str = Field(examples=["corrupt_image"])
    message: str
    request_id: str | None = None
    details: list[dict[str, Any]] | None = None


class Quality(BaseModel):
    score: float = Field(ge=0.0, le=1.0, description="1 - P(ungradable); higher is better.")
    is_fundus: bool
    fundus_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="The gate's P(colour fundus photograph); null without a detector."
    )
    gradable: bool
    reasons: list[str] = Field(description="Stable reason codes; empty for a gradable fundus.")


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    sha256: str


class ImageInfo(BaseModel):
    sha256: str
    width: int
    height: int


class Timings(BaseModel):
    decode: float
    preprocess: float
    queue: float | None = Field(None, description="Waiting for the model (dynamic batching).")
    inference: float | None = Field(None, description="The model call (shared by a batch); None if skipped.")
    total: float


class Explanation(BaseModel):
    method: str
    heatmap_png_base64: str = Field(description="PNG: the heatmap overlaid on the cropped fundus.")
    fundus_png_base64: str = Field(
        description="PNG: the same cropped fundus without the heatmap, for overlays at any opacity."
    )
    width: int
    height: int


class GradeResponse(BaseModel):
    """The answer for one image. ``grade`` and its companions are null unless ``status`` is ``graded``."""

    model_config = ConfigDict(protected_namespaces=())

    request_id: str = Field(description="The service's own id of this answer: the key of its audit record.")
    client_request_id: str | None = Field(
        None, description="The caller's X-Request-ID, when it was a valid id (kept beside ours, never as the key)."
    )
    status: ResultStatus
    grade: int | None = Field(None, ge=0, le=NUM_GRADES - 1)
    grade_name: str | None = None
    referable: bool | None = Field(
        None, description="Referred: the grade is 2 or worse, or the risk reached the operating point's threshold."
    )
    referral_reason: ReferralReason | None = Field(
        None,
        description="Why it was referred: grade (2 or worse), risk (grade 0-1, but P(referable) at or over the "
        "operating point's threshold) or none.",
    )
    operating_point: str | None = Field(None, description="The named operating point the referral was decided at.")
    referable_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="That point's threshold on the calibrated P(referable)."
    )
    urgency: Urgency = Field(description="routine, refer, urgent (grade 4), or retake when not graded.")
    action: Action = Field(description="The recommended next step (retinagrade.referral), a stable code.")
    probabilities: list[float] | None = Field(None, min_length=NUM_GRADES, max_length=NUM_GRADES)
    p_referable: float | None = Field(None, description="Calibrated P(grade >= 2): the estimated risk of referable DR.")
    confidence: float | None = Field(None, description="Calibrated probability of the reported grade.")
    p_dme: float | None = Field(
        None, ge=0.0, le=1.0, description="Calibrated probability of diabetic macular oedema (models with a DME head)."
    )
    dme: bool | None = Field(None, description="Macular oedema at its own operating point (models with a DME head).")
    quality: Quality
    model: ModelRef
    site: str | None = Field(
        None, description="The site profile whose operating point graded the image; null: the model's global one."
    )
    image: ImageInfo
    timings_ms: Timings
    explanation: Explanation | None = None
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="What a DICOM input said about patient and eye, keyed by DICOM keyword (ImageLaterality, "
        "PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID, Modality); empty otherwise.",
    )


class PairedAnswer(BaseModel):
    """This eye's answer from both eyes of its patient (the model's fellow-eye rule, ``fellow_eye`` in
    ``/v1/model``); the image's own ``result`` is the single-image answer and does not change."""

    grade: int = Field(ge=0, le=NUM_GRADES - 1)
    grade_name: str
    referable: bool
    p_referable: float = Field(ge=0.0, le=1.0)
    probabilities: list[float] = Field(min_length=NUM_GRADES, max_length=NUM_GRADES)
    fellow_images: list[int] = Field(description="Indices of the other eye's graded images it used.")


class BatchItem(BaseModel):
    """One image of a batch: its result, or the error that kept it from being graded."""

    index: int
    filename: str | None = None
    eye: Eye | None = None
    patient_id: str | None = None
    result: GradeResponse | None = None
    paired: PairedAnswer | None = Field(
        default=None,
        description="Set when the image was graded, is tagged with a patient and an eye, and a graded image of "
        "the other eye is in the batch (and the model has a fellow-eye rule).",
    )
    error: ErrorBody | None = None


class EyeSummary(BaseModel):
    eye: Eye | None
    images: list[int] = Field(description="Indices of this eye's images in the batch.")
    status: EyeStatus


class PatientReferral(BaseModel):
    patient_id: str
    decision: ReferralDecision
    urgency: Urgency | None = Field(description="The most urgent referable image when referred; null if undecided.")
    reason: str
    eyes: list[EyeSummary]


class BatchResponse(BaseModel):
    request_id: str
    client_request_id: str | None = None
    items: list[BatchItem]
    patients: list[PatientReferral]


class Liveness(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ready"]
    model: ModelRef
    warmup_ms: float
    audit: Literal["ok", "disabled"] = Field(description="The audit store took a probe write (or is disabled).")
