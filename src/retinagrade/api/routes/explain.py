"""Explanations as images: where the model's evidence lies, over the cropped fundus."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from retinagrade.api.dependencies import ClientRequestIdDep, RequestIdDep, ServiceDep, SettingsDep, StartedDep
from retinagrade.api.errors import NotExplainableError
from retinagrade.api.routes.grade import ERRORS, EvidenceQuery, OperatingPointHeader, SiteHeader
from retinagrade.api.uploads import SINGLE_IMAGE_BODY, form_field, read_image

router = APIRouter(prefix="/v1", tags=["explanations"])


@router.post(
    "/explain",
    summary="Heatmap of the model's evidence as a PNG",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "The heatmap over the cropped fundus; grade (and site) in X-Retinagrade-* headers.",
        },
        **ERRORS,
        422: {
            "model": ERRORS[422]["model"],
            "description": "Missing field, or an image that was not graded.",
        },
    },
    openapi_extra=SINGLE_IMAGE_BODY,
)
async def explain(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    client_request_id: ClientRequestIdDep,
    started: StartedDep,
    site: SiteHeader = None,
    operating_point: OperatingPointHeader = None,
    evidence: EvidenceQuery = "severity",
) -> Response:
    """The site and operating point decide the grade in the headers, as for ``/v1/grade`` (header or form
    field); ``evidence=dme`` shows the macular-oedema head's evidence instead of the severity head's."""
    await service.check_audit()
    with service.intake.guard(request, settings.max_request_bytes) as body:
        data = await read_image(body, settings.max_image_bytes)
        with service.admit(1):
            answer, png = await service.grade(
                data,
                request_id=request_id,
                started=started,
                explain=True,
                client_request_id=client_request_id,
                site=site or await form_field(body, "site"),
                operating_point=operating_point or await form_field(body, "operating_point"),
                evidence=evidence,
            )
    if png is None:
        raise NotExplainableError(
            f"The image was not graded (status {answer.status}; reasons: "
            f"{', '.join(answer.quality.reasons)}), so there is no model evidence to show."
        )
    headers = {
        "X-Retinagrade-Status": answer.status,
        "X-Retinagrade-Grade": str(answer.grade),
        "X-Retinagrade-Referable": str(answer.referable).lower(),
        "X-Retinagrade-Referral-Reason": str(answer.referral_reason),
        "X-Retinagrade-Operating-Point": str(answer.operating_point),
        "X-Retinagrade-Evidence": evidence,
    }
    if answer.site:
        headers["X-Retinagrade-Site"] = answer.site
    return Response(png, media_type="image/png", headers=headers)
