"""Grading: one image, or a batch of images with per-patient referral decisions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from retinagrade.api.dependencies import ClientRequestIdDep, RequestIdDep, ServiceDep, SettingsDep, StartedDep
from retinagrade.api.schemas import BatchItem, BatchResponse, ErrorBody, EyeSummary, GradeResponse, PatientReferral
from retinagrade.api.uploads import BATCH_BODY, SINGLE_IMAGE_BODY, read_batch, read_image
from retinagrade.errors import InputError
from retinagrade.referral import TaggedOutcome, patient_referrals

router = APIRouter(prefix="/v1/grade", tags=["grading"])

ExplainQuery = Annotated[bool, Query(description="Add a heatmap of the model's evidence (PNG, base64).")]

ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Empty, corrupt or truncated image, or a malformed body.",
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
    responses=ERRORS,
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
) -> GradeResponse:
    """An ungradable or non-fundus image is a 200 with that ``status``, not an error.

    The body is read first (its bytes charged to the service's byte budget), and only an image that was
    read takes a place in the queue.
    """
    await service.check_audit()
    with service.intake.guard(request, settings.max_request_bytes) as body:
        data = await read_image(body, settings.max_image_bytes)
        with service.admit(1):
            response, _ = await service.grade(
                data, request_id=request_id, started=started, explain=explain, client_request_id=client_request_id
            )
    return response


@router.post(
    "/batch",
    response_model=BatchResponse,
    summary="Grade several images, per patient",
    responses=ERRORS,
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
) -> BatchResponse:
    """Each image gets a result or an error of its own; one bad file never fails the others.

    Images tagged with a ``patient_id`` get a referral decision per patient from both eyes: refer if either
    eye is referable; ``cannot_decide`` if an image was not graded or an eye is missing and none is referable.
    """
    await service.check_audit()
    with service.intake.guard(request, settings.max_batch_request_bytes) as body:
        upload = await read_batch(body, settings.max_image_bytes, settings.max_batch_images)
        with service.admit(len(upload.images)):
            answers = await service.grade_many(
                upload.images,
                request_id=request_id,
                started=started,
                explain=explain,
                client_request_id=client_request_id,
            )
    items = []
    outcomes = []
    for index, answer in enumerate(answers):
        item = BatchItem(
            index=index,
            filename=upload.filenames[index],
            eye=upload.eyes[index],
            patient_id=upload.patient_ids[index],
        )
        if isinstance(answer, InputError):
            item.error = ErrorBody(code=answer.code, message=answer.message, request_id=f"{request_id}.{index}")
        else:
            item.result = answer
        items.append(item)
        patient = upload.patient_ids[index]
        if patient is not None:
            graded = None if isinstance(answer, InputError) else answer
            referable = graded.referable if graded else None
            urgency = graded.urgency if graded and graded.status == "graded" else None
            outcomes.append(TaggedOutcome(index, patient, upload.eyes[index], referable, urgency))
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
