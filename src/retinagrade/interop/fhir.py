"""Results as a FHIR R4 Bundle for a hospital's record system.

Shape (codes in :mod:`retinagrade.interop.findings`, sources in docs/integration.md):

- one ``Device`` for the algorithm (name, version, model sha256, site profile, intended use): the DICOM-SR-to-
  FHIR mapping turns the SR's Algorithm Identification (TID 4019) into such a Device referenced by every
  Observation's ``device``;
- per photograph one ``Observation`` (status ``preliminary``: no person has verified it) coded with the
  eye-specific LOINC severity code, the ICDR grade as a LOINC answer, ``bodySite`` the eye (SNOMED CT), and
  components for referable yes/no, P(referable), gradable yes/no, the gate's quality score and the reasons a
  photo was not graded (then the value is absent with a ``dataAbsentReason``);
- per patient and study one ``DiagnosticReport`` listing its Observations, with a conclusion over both eyes
  (refer if either eye is referable; cannot decide if an eye was not graded and none is referable);
- a ``Patient`` (identifier only) and an ``ImagingStudy`` (study, series and SOP instance UIDs) when the input
  was DICOM, so the report links to the images in the PACS.

Values from a DICOM header or a file name are made valid first: a UID that is not a DICOM UID (FHIR's ``id``
and ``urn:oid:`` need one) is left out with what it names, a Modality that is no defined term is ``OP``, odd
whitespace in text becomes a space. Every resource is then checked with fhir.resources (R4B models, which R4
resources of this shape satisfy) before the Bundle is returned, so a malformed Bundle is a bug caught here and
never sent.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Final

from retinagrade.interop.findings import (
    DME,
    EYE_SITE,
    GRADABLE,
    ICDR_ANSWERS,
    NO,
    OPERATING_POINT,
    P_DME,
    P_REFERABLE,
    QUALITY_SCORE,
    QUALITY_WARNING,
    REFERABLE,
    REFERABLE_THRESHOLD,
    REFERRAL_REASON,
    REFERRAL_REASONS,
    REPORT_TITLE,
    SEVERITY,
    YES,
    AlgorithmInfo,
    Concept,
    EyeFinding,
    RecordLike,
    finding_from_record,
    reason_concept,
)
from retinagrade.report import ResultRecord, RunContext, register_writer

FHIR_MEDIA_TYPE: Final = "application/fhir+json"
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
PATIENT_ID_SYSTEM: Final = "urn:retinagrade:patient-id"
IMAGE_SYSTEM: Final = "urn:retinagrade:image"
MODEL_SHA256_SYSTEM: Final = "urn:retinagrade:model-sha256"
DATA_ABSENT: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM: Final = "http://unitsofmeasure.org"


#: A DICOM UID (PS3.5 9.1): what FHIR's ``id`` and ``urn:oid:`` values may carry from a header.
_DICOM_UID: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: A DICOM modality defined term (CID 29: ``OP``, ``XC``, ``OT``...), the shape FHIR's ``code`` gets here.
_MODALITY: Final = re.compile(r"[A-Z0-9_]{1,16}")
#: Whitespace FHIR's ``string`` does not allow (it allows space, CR, LF and tab).
_ODD_WHITESPACE: Final = re.compile(r"[^\S \r\n\t]")


def _uid(value: str | None) -> str | None:
    """A header's UID if it is a valid DICOM UID; None (the field is left out) otherwise."""
    return value if value and len(value) <= 64 and _DICOM_UID.fullmatch(value) else None


def _text(value: str | None) -> str | None:
    """A header's or file's text as a FHIR ``string``: odd whitespace (vertical tab...) as spaces; None if empty."""
    text = _ODD_WHITESPACE.sub(" ", value or "").strip()
    return text or None


def _modality(value: str | None) -> str:
    """The header's Modality as a DICOM defined term; ``OP`` when it is missing or no such term."""
    code = (value or "").strip().upper()
    return code if _MODALITY.fullmatch(code) else "OP"


@dataclass(frozen=True)
class FhirItem:
    """One photograph to report: its name (file or upload), its finding, and who and what it belongs to.

    ``patient_id``, ``study_uid`` and ``laterality`` fall back to the finding's DICOM metadata.
    """

    name: str
    finding: EyeFinding
    patient_id: str | None = None


def _codeable(concept: Concept) -> dict[str, Any]:
    return {"coding": [{"system": concept.system, "code": concept.code, "display": concept.display}]}


def _yes_no(value: bool) -> dict[str, Any]:
    return _codeable(YES if value else NO)


def _unitless(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": UCUM, "code": "1"}


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _device(algorithm: AlgorithmInfo) -> dict[str, Any]:
    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": MODEL_SHA256_SYSTEM, "value": algorithm.model_sha256}],
        "status": "active",
        "manufacturer": "retinagrade",
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "type": {"text": "Diabetic retinopathy grading software (decision support)"},
        "version": [{"value": algorithm.version}],
    }
    if algorithm.site_profile:
        device["property"] = [{"type": {"text": "site profile"}, "valueCode": [{"text": algorithm.site_profile}]}]
    if algorithm.intended_use:
        device["note"] = [{"text": f"Intended use: {algorithm.intended_use}"}]
    return device


def _components(finding: EyeFinding) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if finding.referable is not None:
        parts.append({"code": _codeable(REFERABLE), "valueCodeableConcept": _yes_no(finding.referable)})
    if finding.referral_reason in REFERRAL_REASONS:
        reason = REFERRAL_REASONS[str(finding.referral_reason)]
        parts.append({"code": _codeable(REFERRAL_REASON), "valueCodeableConcept": _codeable(reason)})
    if finding.operating_point:
        parts.append({"code": _codeable(OPERATING_POINT), "valueString": finding.operating_point})
    if finding.referable_threshold is not None:
        parts.append({"code": _codeable(REFERABLE_THRESHOLD), "valueQuantity": _unitless(finding.referable_threshold)})
    if finding.p_referable is not None:
        parts.append({"code": _codeable(P_REFERABLE), "valueQuantity": _unitless(finding.p_referable)})
    parts.append({"code": _codeable(GRADABLE), "valueCodeableConcept": _yes_no(finding.gradable)})
    if finding.quality_score is not None:
        parts.append({"code": _codeable(QUALITY_SCORE), "valueQuantity": _unitless(finding.quality_score)})
    if finding.quality_warning:
        parts.append({"code": _codeable(QUALITY_WARNING), "valueCodeableConcept": _yes_no(True)})
    parts.extend(
        {"code": _codeable(finding.reason_concept), "valueCodeableConcept": _codeable(reason_concept(reason))}
        for reason in finding.reasons
    )
    return parts


def _observation_of(
    item: FhirItem,
    code: dict[str, Any],
    components: list[dict[str, Any]],
    device_ref: str,
    patient_ref: str | None,
    study_ref: str | None,
    now: str,
) -> dict[str, Any]:
    """What every Observation of one photograph says: who, which eye, which image, by which device, when."""
    finding = item.finding
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [
            {"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]},
        ],
        "code": code,
        "effectiveDateTime": now,
        "issued": now,
        "device": {"reference": device_ref},
        "component": components,
        "note": [{"text": f"Image: {_text(item.name) or 'unnamed'}"}],
    }
    sop_uid = _uid(finding.metadata.get("SOPInstanceUID"))
    if sop_uid:
        obs["identifier"] = [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sop_uid}"}]
    if patient_ref is not None:
        obs["subject"] = {"reference": patient_ref}
    if study_ref is not None:
        obs["derivedFrom"] = [{"reference": study_ref}]
    if finding.laterality is not None:
        obs["bodySite"] = _codeable(EYE_SITE[finding.laterality])
    return obs


def _observation(
    item: FhirItem, device_ref: str, patient_ref: str | None, study_ref: str | None, now: str
) -> dict[str, Any]:
    """The retinopathy severity of one photograph (or why it has none), with the referral and its reason."""
    finding = item.finding
    code = _codeable(SEVERITY[finding.laterality])
    obs = _observation_of(item, code, _components(finding), device_ref, patient_ref, study_ref, now)
    if finding.grade is not None:
        obs["valueCodeableConcept"] = _codeable(ICDR_ANSWERS[finding.grade])
        obs["interpretation"] = [{"text": "referable" if finding.referable else "not referable"}]
        obs["note"].append({"text": finding.referral_sentence})
    else:
        absent = "error" if finding.status == "error" else "not-performed"
        obs["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": absent}]}
    return obs


def _dme_observation(
    item: FhirItem, device_ref: str, patient_ref: str | None, study_ref: str | None, now: str
) -> dict[str, Any] | None:
    """Diabetic macular oedema as its own Observation (SNOMED CT 312912001 present or absent), when measured."""
    finding = item.finding
    if finding.dme is None or finding.p_dme is None:
        return None
    components = [{"code": _codeable(P_DME), "valueQuantity": _unitless(finding.p_dme)}]
    obs = _observation_of(item, _codeable(DME), components, device_ref, patient_ref, study_ref, now)
    obs["valueCodeableConcept"] = _yes_no(finding.dme)
    return obs


def _conclusion(findings: list[EyeFinding]) -> str:
    if any(f.referable for f in findings):
        return "Refer: referable diabetic retinopathy in at least one eye (automated, preliminary)."
    eyes = {f.laterality for f in findings if f.status == "graded"}
    if any(f.status != "graded" for f in findings) or not {"R", "L"} <= eyes:
        return "Cannot decide: an eye was not graded or is missing; no graded eye is referable."
    return "No referable diabetic retinopathy in either eye (automated, preliminary)."


def _imaging_study(items: list[FhirItem], study_uid: str, patient_ref: str) -> dict[str, Any]:
    series: dict[str, dict[str, Any]] = {}
    for item in items:
        meta = item.finding.metadata
        # A UID that breaks FHIR's id pattern is left out with what it names, never sent to fail validation.
        series_uid, sop_uid = _uid(meta.get("SeriesInstanceUID")), _uid(meta.get("SOPInstanceUID"))
        if not series_uid or not sop_uid:
            continue
        entry = series.setdefault(
            series_uid,
            {
                "uid": series_uid,
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": _modality(meta.get("Modality")),
                },
                "instance": [],
            },
        )
        sop_class = _uid(meta.get("SOPClassUID")) or "1.2.840.10008"
        entry["instance"].append(
            {"uid": sop_uid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{sop_class}"}}
        )
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": {"reference": patient_ref},
    }
    if series:
        study["series"] = list(series.values())
    return study


def build_bundle(items: Iterable[FhirItem], algorithm: AlgorithmInfo) -> dict[str, Any]:
    """A FHIR R4 ``collection`` Bundle for the items, validated resource by resource.

    Raises:
        ValueError: a resource failed validation (a defect in this module, never in the input).
    """
    now = datetime.now(UTC).isoformat(timespec="seconds")
    entries: list[dict[str, Any]] = []

    def add(resource: dict[str, Any]) -> str:
        url = _urn()
        entries.append({"fullUrl": url, "resource": resource})
        return url

    device_ref = add(_device(algorithm))
    groups: dict[tuple[str, str] | int, list[FhirItem]] = {}
    for index, item in enumerate(items):
        meta = item.finding.metadata
        patient = _text(item.patient_id or meta.get("PatientID")) or ""
        study = meta.get("StudyInstanceUID", "")
        # Untagged photos (plain image files) each get a report of their own: never mix two people.
        key: tuple[str, str] | int = (patient, study) if patient or study else index
        groups.setdefault(key, []).append(item)
    patients: dict[str, str] = {}
    for key, members in groups.items():
        patient_id = key[0] if isinstance(key, tuple) else ""
        study_uid = key[1] if isinstance(key, tuple) else ""
        patient_ref = None
        if patient_id:
            if patient_id not in patients:
                patients[patient_id] = add(
                    {"resourceType": "Patient", "identifier": [{"system": PATIENT_ID_SYSTEM, "value": patient_id}]}
                )
            patient_ref = patients[patient_id]
        study_ref = add(_imaging_study(members, study_uid, patient_ref)) if _uid(study_uid) and patient_ref else None
        observation_refs = [add(_observation(m, device_ref, patient_ref, study_ref, now)) for m in members]
        for member in members:
            oedema = _dme_observation(member, device_ref, patient_ref, study_ref, now)
            if oedema is not None:
                observation_refs.append(add(oedema))
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {**_codeable(REPORT_TITLE), "text": REPORT_TITLE.display},
            "effectiveDateTime": now,
            "issued": now,
            "result": [{"reference": ref} for ref in observation_refs],
            "conclusion": _conclusion([m.finding for m in members]),
        }
        if patient_ref is not None:
            report["subject"] = {"reference": patient_ref}
        if study_ref is not None:
            report["imagingStudy"] = [{"reference": study_ref}]
        add(report)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": now,
        "entry": entries,
    }
    validate(bundle)
    return bundle


def validate(bundle: Mapping[str, Any]) -> None:
    """Check the Bundle and each resource in it against the FHIR models (fhir.resources, R4B).

    Raises:
        ValueError: the first resource that does not validate, with pydantic's description.
    """
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class("Bundle").model_validate(dict(bundle))
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def bundle_from_records(records: Iterable[RecordLike], context: RunContext) -> dict[str, Any]:
    """The Bundle for a run's result records (the CLI's ``--output results.fhir.json``)."""
    rows = list(records)
    algorithm = AlgorithmInfo(
        name=context.model_name or "retinagrade",
        version=context.model_version or "unknown",
        model_sha256=context.model_sha256 or "unknown",
        intended_use=context.intended_use,
        site_profile=context.site or ", ".join(sorted({r.site for r in rows if r.site})),
    )
    return build_bundle([FhirItem(r.image, finding_from_record(r)) for r in rows], algorithm)


@register_writer("fhir", (".fhir.json",), context=True)
class FhirBundleWriter:
    """The report registry's ``fhir`` format (``grade -o results.fhir.json``): the run's FHIR R4 Bundle.

    A Bundle is one JSON document whose per-patient reports need all of a patient's eyes, so records are kept
    and the Bundle is written by :meth:`close`; an interrupted run still gets the Bundle of what finished.
    """

    def __init__(self, stream: IO[str], context: RunContext) -> None:
        self._stream = stream
        self._context = context
        self._records: list[ResultRecord] = []

    def write(self, record: ResultRecord) -> None:
        self._records.append(record)

    def close(self) -> None:
        json.dump(bundle_from_records(self._records, self._context), self._stream, indent=1)
        self._stream.write("\n")
        self._stream.flush()
