"""Grading: one image, or a batch of images with per-patient referral decisions."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from retinagrade.api.dependencies import ClientRequestIdDep, RequestIdDep, ServiceDep, SettingsDep, StartedDep
from retinagrade.api.interop import (
    BATCH_ANSWERS,
    SINGLE_ANSWERS,
    algorithm_of,
    eye_and_patient,
    fhir_response,
    negotiate,
    require_dicom,
    sr_response,
)
from retinagrade.api.schemas import (
    BatchItem,
    BatchResponse,
    ErrorBody,
    EyeSummary,
    GradeResponse,
    PairedAnswer,
    PatientReferral,
)
from retinagrade.api.service import BatchAnswer
from retinagrade.api.sites import OPERATING_POINT_HEADER
from retinagrade.api.uploads import BATCH_BODY, SINGLE_IMAGE_BODY, form_field, read_batch, read_image
from retinagrade.errors import RetinagradeError
from retinagrade.eyes import paired_answers
from retinagrade.pipeline import GradeResult
from retinagrade.referral import TaggedOutcome, patient_referrals

router = APIRouter(prefix="/v1/grade", tags=["grading"])

ExplainQuery = Annotated[bool, Query(description="Add a heatmap of the model's evidence (PNG, base64).")]
EvidenceQuery = Annotated[
    Literal["severity", "dme"],
    Query(description="Whose evidence the heatmap shows: the severity head's, or the macular oedema head's (dme)."),
]
SiteHeader = Annotated[
    str | None,
    Header(
        alias="X-Retinagrade-Site",
        description="Site profile to grade with (RETINAGRADE_SITE_PROFILES); default: the configured default site.",
    ),
]

OperatingPointHeader = Annotated[
    str | None,
    Header(
        alias=OPERATING_POINT_HEADER,
        description="Named operating point to refer at (`/v1/model` lists them); default: the site's, else the "
        "service's (RETINAGRADE_OPERATING_POINT), else the model's default.",
    ),
]

ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Empty, corrupt or truncated image, a malformed body, or an unknown site or operating point.",
        401: "Missing or wrong X-API-Key (when keys are configured).",
        408: "The body arrived too slowly or not at all (the connection is closed).",
        413: "Image, batch or body too large (bytes, pixels, decoded size or number of files).",
        415: "Not an accepted image type.",
        422: "Missing or invalid field, or a multi-page TIFF.",
        503: "At capacity (see Retry-After), still starting, or the audit trail cannot be written.",
    }.items()
}


@router.post(
    "",
    response_model=GradeResponse,
    summary="Grade one fundus photograph",
    responses={**ERRORS, **SINGLE_ANSWERS},
    openapi_extra=SINGLE_IMAGE_BODY,
)
async def grade(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    client_request_id: ClientRequestIdDep,
    started: StartedDep,
    explain: ExplainQuery = False,
    evidence: EvidenceQuery = "severity",
    site: SiteHeader = None,
    operating_point: OperatingPointHeader = None,
) -> Any:
    """An ungradable or non-fundus image is a 200 with that ``status``, not an error.

    The body is read first (its bytes charged to the service's byte budget), and only an image that was
    read takes a place in the queue. ``Accept: application/fhir+json`` answers with a FHIR R4 Bundle;
    ``Accept: application/dicom`` (DICOM input only) with a DICOM Comprehensive SR that references the
    uploaded instance (docs/integration.md).
    """
    wanted = negotiate(request)
    await service.check_audit()
    intended_use = str(service.pipeline.spec.raw.get("intended_use", ""))

    def render(result: GradeResult, response: GradeResponse) -> Response:
        # Before the audit record: an answer that cannot be rendered is neither delivered nor recorded.
        algorithm = algorithm_of(service.model_ref, intended_use, site=response.site or "")
        if wanted == "fhir":
            return fhir_response([(request_id, result, None)], algorithm)
        return sr_response(data, result, algorithm)

    with service.intake.guard(request, settings.max_request_bytes) as body:
        data = await read_image(body, settings.max_image_bytes)
        if wanted == "dicom":
            require_dicom(data)
        with service.admit(1):
            _, response, _, rendered = await service.grade_result(
                data,
                request_id=request_id,
                started=started,
                explain=explain,
                client_request_id=client_request_id,
                site=site or await form_field(body, "site"),
                operating_point=operating_point or await form_field(body, "operating_point"),
                evidence=evidence,
                render=None if wanted == "json" else render,
            )
    return response if rendered is None else rendered


@router.post(
    "/batch",
    response_model=BatchResponse,
    summary="Grade several images, per patient",
    responses={**ERRORS, **BATCH_ANSWERS},
    openapi_extra=BATCH_BODY,
)
async def grade_batch(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    client_request_id: ClientRequestIdDep,
    started: StartedDep,
    explain: ExplainQuery = False,
    evidence: EvidenceQuery = "severity",
    site: SiteHeader = None,
    operating_point: OperatingPointHeader = None,
) -> Any:
    """Each image gets a result or an error of its own; one bad file never fails the others.

    Images tagged with a ``patient_id`` get a referral decision per patient from both eyes: refer if either
    eye is referable; ``cannot_decide`` if an image was not graded or an eye is missing and none is referable.
    An image tagged with patient and eye whose other eye is also in the batch gets a ``paired`` answer, the
    model's fellow-eye rule (the patient decision stays on the single-image answers).
    """
    wanted = negotiate(request, dicom_offered=False)
    await service.check_audit()
    intended_use = str(service.pipeline.spec.raw.get("intended_use", ""))

    def tags(answers: list[BatchAnswer]) -> list[tuple[Literal["left", "right"] | None, str | None]]:
        # The client's tags first; a DICOM file's own Image Laterality and Patient ID where it sent none.
        return [
            eye_and_patient(
                answer.metadata if isinstance(answer, RetinagradeError) else answer[0].metadata,
                upload.eyes[index],
                upload.patient_ids[index],
            )
            for index, answer in enumerate(answers)
        ]

    def render_fhir(answers: list[BatchAnswer]) -> Response:
        # Before the audit records: a Bundle that cannot be rendered is neither delivered nor recorded.
        used = sorted({a[1].site for a in answers if not isinstance(a, RetinagradeError) and a[1].site})
        algorithm = algorithm_of(service.model_ref, intended_use, site=", ".join(used))
        tagged = tags(answers)
        return fhir_response(
            [
                (
                    upload.filenames[index] or f"{request_id}.{index}",
                    answer if isinstance(answer, RetinagradeError) else answer[0],
                    tagged[index][1],
                )
                for index, answer in enumerate(answers)
            ],
            algorithm,
            eyes=[eye for eye, _ in tagged],
        )

    with service.intake.guard(request, settings.max_batch_request_bytes) as body:
        upload = await read_batch(body, settings.max_image_bytes, settings.max_batch_images)
        with service.admit(len(upload.images)):
            answers, bundle = await service.grade_many_results(
                upload.images,
                request_id=request_id,
                started=started,
                explain=explain,
                client_request_id=client_request_id,
                site=site or await form_field(body, "site"),
                operating_point=operating_point or await form_field(body, "operating_point"),
                evidence=evidence,
                render=render_fhir if wanted == "fhir" else None,
            )
    if bundle is not None:
        return bundle
    items = []
    outcomes = []
    for index, (answer, (eye, patient)) in enumerate(zip(answers, tags(answers), strict=True)):
        item = BatchItem(index=index, filename=upload.filenames[index], eye=eye, patient_id=patient)
        if isinstance(answer, RetinagradeError):
            item.error = ErrorBody(code=answer.code, message=answer.message, request_id=f"{request_id}.{index}")
        else:
            item.result = answer[1]
        items.append(item)
        if patient is not None:
            graded = None if isinstance(answer, RetinagradeError) else answer[1]
            referable = graded.referable if graded else None
            urgency = graded.urgency if graded and graded.status == "graded" else None
            outcomes.append(TaggedOutcome(index, patient, eye, referable, urgency))
    tagged = [
        (
            item.index,
            (item.patient_id, item.eye) if item.patient_id is not None and item.eye is not None else None,
            None if isinstance(answer, RetinagradeError) else answer[0].raw,
        )
        for item, answer in zip(items, answers, strict=True)
    ]
    for key, paired in paired_answers(tagged, service.pipeline.spec).items():
        decision = paired.decision
        items[cast(int, key)].paired = PairedAnswer(
            grade=decision.grade,
            grade_name=decision.grade_name,
            referable=decision.referable,
            p_referable=decision.p_referable,
            probabilities=list(decision.probabilities),
            fellow_images=[cast(int, k) for k in paired.fellows],
        )
    patients = [
        PatientReferral(
            patient_id=r.patient_id,
            decision=r.decision,
            urgency=r.urgency,
            reason=r.reason,
            eyes=[EyeSummary(eye=e.eye, images=list(e.images), status=e.status) for e in r.eyes],
        )
        for r in patient_referrals(outcomes)
    ]
    return BatchResponse(
        request_id=request_id,
        client_request_id=client_request_id,
        items=items,
        patients=patients,
    )
