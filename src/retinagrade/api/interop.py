"""Answers in the hospital's formats: content negotiation and rendering of FHIR and DICOM SR responses.

``Accept: application/fhir+json`` turns a grading answer into a FHIR R4 Bundle, ``Accept: application/dicom``
(DICOM input only) into a Comprehensive SR; anything else, or no Accept header, keeps retinagrade's JSON.
Both need the ``[dicom]`` extra, imported only when asked for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from fastapi import Request
from fastapi.responses import Response

from retinagrade.api.errors import ApiError
from retinagrade.errors import RetinagradeError

Representation = Literal["json", "fhir", "dicom"]
JSON: Final = "application/json"
FHIR_JSON: Final = "application/fhir+json"
DICOM: Final = "application/dicom"
_OFFERED: Final[Mapping[str, Representation]] = {JSON: "json", FHIR_JSON: "fhir", DICOM: "dicom"}
_WILDCARDS: Final[Mapping[str, Representation]] = {"*/*": "json", "application/*": "json"}

#: ``Accept`` values to state in OpenAPI for the routes that offer them.
FHIR_EXAMPLE: Final[dict[str, Any]] = {
    "resourceType": "Bundle",
    "type": "collection",
    "timestamp": "2026-12-01T09:00:00+00:00",
    "entry": [
        {
            "fullUrl": "urn:uuid:4f7d0a52-0b1e-4c57-9a43-1d2b8f0e6a11",
            "resource": {
                "resourceType": "Device",
                "identifier": [{"system": "urn:retinagrade:model-sha256", "value": "<model sha256>"}],
                "status": "active",
                "manufacturer": "retinagrade",
                "deviceName": [{"name": "retinagrade-dr", "type": "model-name"}],
                "version": [{"value": "0.3.0"}],
                "note": [{"text": "Intended use: decision support for diabetic-retinopathy screening..."}],
            },
        },
        {
            "fullUrl": "urn:uuid:9b1c2e4a-6d7f-4e21-8a55-3c0d9e7f1b22",
            "resource": {
                "resourceType": "Observation",
                "status": "preliminary",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "imaging",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "71491-5",
                            "display": "Right eye Diabetic retinopathy severity level",
                        }
                    ]
                },
                "bodySite": {
                    "coding": [{"system": "http://snomed.info/sct", "code": "362502000", "display": "Entire right eye"}]
                },
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "LA18645-4",
                            "display": "Moderate non-proliferative retinopathy",
                        }
                    ]
                },
                "component": [
                    {
                        "code": {"coding": [{"system": "urn:retinagrade:codes", "code": "referable-dr"}]},
                        "valueCodeableConcept": {
                            "coding": [{"system": "http://snomed.info/sct", "code": "373066001", "display": "Yes"}]
                        },
                    },
                    {
                        "code": {"coding": [{"system": "urn:retinagrade:codes", "code": "p-referable-dr"}]},
                        "valueQuantity": {
                            "value": 0.83,
                            "unit": "1",
                            "system": "http://unitsofmeasure.org",
                            "code": "1",
                        },
                    },
                ],
                "device": {"reference": "urn:uuid:4f7d0a52-0b1e-4c57-9a43-1d2b8f0e6a11"},
            },
        },
    ],
}


class NotAcceptableError(ApiError):
    """The client accepts no representation this route can give (an SR for a JPEG, say)."""

    code = "not_acceptable"
    http_status = 406


def negotiate(request: Request, *, dicom_offered: bool = True) -> Representation:
    """The representation the client prefers among those offered (highest ``q``; JSON when none is named).

    Raises:
        NotAcceptableError: a DICOM SR asked for where this route gives none.
    """
    header = request.headers.get("accept", "").strip()
    if not header:
        return "json"
    best: tuple[float, int, Representation] | None = None
    for part in header.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        choice = _OFFERED.get(media) or _WILDCARDS.get(media)
        if choice is None or q <= 0 or (choice == "dicom" and not dicom_offered):
            continue
        # Explicit media types win over wildcards at equal q; then the order the client wrote.
        rank = (q, 0 if media in _WILDCARDS else 1, choice)
        if best is None or rank[:2] > best[:2]:
            best = rank
    if best is None:
        if DICOM in header.lower() and not dicom_offered:
            raise NotAcceptableError(
                "This route does not answer with a DICOM SR; accept application/json or application/fhir+json."
            )
        # Anything else nobody here offers (text/html, a typo): the JSON every client got before Accept
        # meant something, rather than a 406 that would break them.
        return "json"
    return best[2]


def _interop() -> tuple[Any, Any, Any]:
    try:
        from retinagrade.interop import dicom_sr, fhir, findings
    except ImportError:
        raise NotAcceptableError(
            "FHIR and DICOM SR answers need the [dicom] extra on the server (pip install 'retinagrade[dicom]')."
        ) from None
    return dicom_sr, fhir, findings


def algorithm_of(model_ref: Any, intended_use: str, site: str = "") -> Any:
    """The :class:`~retinagrade.interop.findings.AlgorithmInfo` of the served model."""
    _, _, findings = _interop()
    return findings.AlgorithmInfo(model_ref.name, model_ref.version, model_ref.sha256, intended_use, site)


def fhir_response(
    items: Sequence[tuple[str, Any, str | None]],
    algorithm: Any,
    eyes: Sequence[Literal["left", "right"] | None] | None = None,
) -> Response:
    """A FHIR Bundle for ``(name, GradeResult or RetinagradeError, patient id)`` items.

    Args:
        items: each image's name, outcome and patient (the client's tag, else the DICOM header's).
        algorithm: the served model.
        eyes: each image's eye as the client tagged it; the DICOM header's laterality otherwise.
    """
    _, fhir, findings = _interop()
    entries = []
    for index, (name, outcome, patient) in enumerate(items):
        finding = findings.finding_from(outcome)
        tagged = eyes[index] if eyes is not None else None
        if tagged is not None:
            finding = dataclasses.replace(finding, laterality="L" if tagged == "left" else "R")
        entries.append(fhir.FhirItem(name, finding, patient))
    bundle = fhir.build_bundle(entries, algorithm)
    return Response(json.dumps(bundle), media_type=FHIR_JSON)


def require_dicom(data: bytes) -> None:
    """Refuse an SR answer for a non-DICOM upload before grading it.

    Raises:
        NotAcceptableError: the upload is not DICOM, so there is no image for an SR to reference.
    """
    from retinagrade.preprocessing.decode import is_dicom

    _interop()
    if not is_dicom(data):
        raise NotAcceptableError(
            "A DICOM SR answers DICOM input only (it references the source instance); send the photo as "
            "application/dicom, or accept application/json or application/fhir+json."
        )


def sr_response(data: bytes, outcome: Any, algorithm: Any) -> Response:
    """The Comprehensive SR for one DICOM upload (``outcome``: its GradeResult or RetinagradeError), built from
    what its header has (invalid patient and study attributes are left empty).

    Raises:
        NotAcceptableError: the upload is not DICOM, or its header cannot be read or has no valid UIDs to
            reference, so there is no image for an SR to reference.
    """
    require_dicom(data)
    dicom_sr, _, findings = _interop()
    from retinagrade.preprocessing.dicom import read_dataset

    try:
        header = read_dataset(data, stop_before_pixels=True)
    except RetinagradeError:
        raise NotAcceptableError("The DICOM header cannot be read, so no SR can reference it.") from None
    try:
        sr = dicom_sr.build_sr(header, findings.finding_from(outcome), algorithm)
    except dicom_sr.SourceNotReferenceableError:
        raise NotAcceptableError(
            "The DICOM header has no valid Study, Series and SOP Instance UIDs, so no SR can reference the photo; "
            "accept application/json or application/fhir+json."
        ) from None
    return Response(dicom_sr.sr_bytes(sr), media_type=DICOM)


def eye_and_patient(
    metadata: Mapping[str, str], eye: Literal["left", "right"] | None, patient_id: str | None
) -> tuple[Literal["left", "right"] | None, str | None]:
    """The tags a client sent, else what the DICOM header says (``ImageLaterality``, ``PatientID``)."""
    if eye is None:
        eye = {"L": "left", "R": "right"}.get(metadata.get("ImageLaterality", ""))  # type: ignore[assignment]
    return eye, patient_id or metadata.get("PatientID") or None


_SR_CONTENT: Final[dict[str, Any]] = {
    "schema": {"type": "string", "format": "binary"},
    "example": "(binary DICOM Part 10: Comprehensive SR, SOP Class 1.2.840.10008.5.1.4.1.1.88.33; "
    "TID 1500 report with Algorithm Name (DCM 111001) and Version (DCM 111003), LOINC 71491-5 / 71490-7 "
    "severity coded LA18643-9..LA18648-8, referable and gradable Yes/No, referencing the uploaded instance)",
}
_NOT_ACCEPTABLE: Final[dict[str, Any]] = {
    "description": "The Accept header allows no representation this route gives (an SR for a non-DICOM upload, "
    "or FHIR/SR without the [dicom] extra on the server).",
}
#: OpenAPI answers of /v1/grade besides its JSON: FHIR and SR, with examples.
SINGLE_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "The grading, as JSON (default), a FHIR R4 Bundle (Accept: application/fhir+json) or, "
        "for DICOM input, a DICOM SR (Accept: application/dicom).",
        "content": {FHIR_JSON: {"example": FHIR_EXAMPLE}, DICOM: _SR_CONTENT},
    },
    406: _NOT_ACCEPTABLE,
}
#: OpenAPI answers of /v1/grade/batch besides its JSON: a FHIR Bundle with a DiagnosticReport per patient.
BATCH_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "The batch, as JSON (default) or a FHIR R4 Bundle with one DiagnosticReport per patient "
        "and study (Accept: application/fhir+json).",
        "content": {FHIR_JSON: {"example": FHIR_EXAMPLE}},
    },
    406: _NOT_ACCEPTABLE,
}
