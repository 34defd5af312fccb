"""The result for one DICOM photograph as a DICOM Comprehensive SR that a PACS files beside it.

The report is an Imaging Measurement Report (TID 1500, built with highdicom) whose one measurement group
references the source image (study, series, SOP instance), names the eye as its finding site and the
algorithm (TID 4019: DCM 111001 Algorithm Name, 111003 Algorithm Version), and codes the findings: the ICDR
grade (LOINC), referable yes/no, gradable yes/no, P(referable) and the gate's quality score. A photograph
that could not be graded gets a report too, coding why (the gate's reasons or the error code) and saying it
in words, so the PACS shows that the photo was seen and a person must look at it.

Patient and study attributes are copied from the source, so the SR joins the photo's study: each one only if
its value is valid for its VR, else it is left empty (they are Type 2), because cameras and anonymisers leave
them out or write them loosely (``1960-03-17``, ``male``, ``25:99``) and a report must not fail for that. Text
is re-encoded as UTF-8 whatever the source's character set. A source without valid Study, Series and SOP
Instance UIDs cannot be referenced: :class:`SourceNotReferenceableError`. The SR's SOP Instance UID is derived
from the source's, so storing it twice stores one object: this is what makes ``retinagrade dicomweb``
restart-safe.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import highdicom as hd
from highdicom._standard_utils import get_sop_class_iod_map
from pydicom import config, uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM, validate_value

from retinagrade.errors import InputError
from retinagrade.interop.findings import (
    DME,
    EYE_SITE,
    GRADABLE,
    ICDR_ANSWERS,
    NO,
    OPERATING_POINT,
    P_DME,
    P_REFERABLE,
    PROCEDURE,
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
    eye_of,
    finding_from_record,
    local,
    reason_concept,
)
from retinagrade.preprocessing.decode import is_dicom
from retinagrade.preprocessing.dicom import dicom_metadata, is_valid_uid, read_dataset

#: Series Description of every SR retinagrade writes: how it (and a person) recognises its own reports.
SR_SERIES_DESCRIPTION: Final = "retinagrade DR grading"
SR_SERIES_NUMBER: Final = 9701
_UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as used by pydicom.uid.generate_uid
_UNITLESS: Final = hd.sr.CodedConcept("1", "UCUM", "no units")
_ENTIRE_EYE: Final = hd.sr.CodedConcept("81745001", "SCT", "Eye")


#: Attributes of the photograph the SR carries (highdicom reads them from its evidence), by the VR their value must
#: satisfy. Patient and study ones are always present (empty when missing or invalid); equipment ones when valid.
_PATIENT_AND_STUDY: Final[dict[str, str]] = {
    "PatientID": "LO",
    "PatientName": "PN",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "StudyID": "SH",
    "AccessionNumber": "SH",
    "ReferringPhysicianName": "PN",
}
_EQUIPMENT: Final[dict[str, str]] = {
    "Manufacturer": "LO",
    "ManufacturerModelName": "LO",
    "DeviceSerialNumber": "LO",
    "InstitutionName": "LO",
    "StationName": "SH",
}
_SEXES: Final = frozenset({"M", "F", "O"})
_REFERENCED_UIDS: Final = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class SourceNotReferenceableError(ValueError):
    """The photograph's header has no valid Study, Series or SOP Instance UID (or an unknown SOP class), so no SR
    can reference it."""


def _valid_value(value: object, vr: str) -> str:
    """``value`` as one string if it is valid for ``vr`` (a real date or time for DA / TM); else empty."""
    if value is None or isinstance(value, MultiValue | list | tuple | bytes):
        return ""
    text = str(value)
    # Control characters other than ESC (ISO 2022 escapes were decoded already) have no place in these names.
    if any(ord(char) < 32 for char in text):
        return ""
    try:
        validate_value(vr, text, config.RAISE)
        if vr == "DA":
            DA(text)
        elif vr == "TM":
            TM(text)
    except (ValueError, TypeError, OverflowError):
        return ""
    return text


def _evidence(source: Dataset) -> Dataset:
    """The source's identity for highdicom: its UIDs, and its patient, study and equipment attributes made valid.

    Raises:
        SourceNotReferenceableError: a UID the reference needs is missing or invalid, or the SOP class is unknown.
    """
    evidence = Dataset()
    for keyword in _REFERENCED_UIDS:
        value = str(source.get(keyword, "") or "")
        if not is_valid_uid(value):
            raise SourceNotReferenceableError(f"the photograph has no valid {keyword}")
        setattr(evidence, keyword, value)
    meta = getattr(source, "file_meta", None)
    sop_class = str(source.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class not in get_sop_class_iod_map():
        raise SourceNotReferenceableError("the photograph's SOP class is missing or unknown")
    evidence.SOPClassUID = sop_class
    for keyword, vr in _PATIENT_AND_STUDY.items():
        value = _valid_value(source.get(keyword), vr)
        setattr(evidence, keyword, value if keyword != "PatientSex" or value in _SEXES else "")
    for keyword, vr in _EQUIPMENT.items():
        value = _valid_value(source.get(keyword), vr)
        if value:
            setattr(evidence, keyword, value)
    # Values were decoded with the source's character set when read. The SR never inherits that set (a lone
    # "ISO 2022 IR 87", a misspelt one, cannot encode them): ASCII needs none, anything else is written as UTF-8.
    if not all(str(element.value).isascii() for element in evidence):
        evidence.SpecificCharacterSet = "ISO_IR 192"
    return evidence


def _coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.code, concept.scheme, concept.display)


def sr_instance_uid(source_sop_instance_uid: str) -> str:
    """The SOP Instance UID of the SR for a source image: the same source always gives the same UID."""
    return uid.generate_uid(_UID_PREFIX, entropy_srcs=["retinagrade-sr", source_sop_instance_uid])


def sr_series_uid(study_instance_uid: str) -> str:
    """One SR series per study, so all of retinagrade's reports on a study sit together."""
    return uid.generate_uid(_UID_PREFIX, entropy_srcs=["retinagrade-sr-series", study_instance_uid])


def placeholder_source(study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str) -> Dataset:
    """A source header for a photograph whose own could not be read: its UIDs, other attributes empty.

    The SR then still sits in the photo's study and references it; the PACS knows the patient by the study.
    """
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.SOPClassUID = sop_class_uid
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, "")
    return ds


def _qualitative(finding: EyeFinding) -> list[hd.sr.QualitativeEvaluation]:
    items = [hd.sr.QualitativeEvaluation(_coded(GRADABLE), _coded(YES if finding.gradable else NO))]
    if finding.grade is not None:
        items.append(
            hd.sr.QualitativeEvaluation(_coded(SEVERITY[finding.laterality]), _coded(ICDR_ANSWERS[finding.grade]))
        )
    if finding.referable is not None:
        items.append(hd.sr.QualitativeEvaluation(_coded(REFERABLE), _coded(YES if finding.referable else NO)))
    if finding.quality_warning:
        items.append(hd.sr.QualitativeEvaluation(_coded(QUALITY_WARNING), _coded(YES)))
    if finding.dme is not None:
        items.append(hd.sr.QualitativeEvaluation(_coded(DME), _coded(YES if finding.dme else NO)))
    if finding.referral_reason in REFERRAL_REASONS:
        reason = REFERRAL_REASONS[str(finding.referral_reason)]
        items.append(hd.sr.QualitativeEvaluation(_coded(REFERRAL_REASON), _coded(reason)))
    if finding.operating_point:
        # Point names are at most 16 characters: a DICOM code value (SH) holds them as they are.
        point = local(finding.operating_point, f"operating point {finding.operating_point}")
        items.append(hd.sr.QualitativeEvaluation(_coded(OPERATING_POINT), _coded(point)))
    items.extend(
        hd.sr.QualitativeEvaluation(_coded(finding.reason_concept), _coded(reason_concept(reason)))
        for reason in finding.reasons
    )
    return items


def _measurements(finding: EyeFinding) -> list[hd.sr.Measurement]:
    values = [
        (P_REFERABLE, finding.p_referable),
        (P_DME, finding.p_dme),
        (REFERABLE_THRESHOLD, finding.referable_threshold),
        (QUALITY_SCORE, finding.quality_score),
    ]
    return [
        hd.sr.Measurement(name=_coded(concept), value=round(float(value), 6), unit=_UNITLESS)
        for concept, value in values
        if value is not None
    ]


def explanation(finding: EyeFinding) -> str:
    """The finding in one sentence, for a person reading the report."""
    if finding.status == "graded":
        if finding.referral_reason is not None:
            return finding.referral_sentence
        refer = "refer" if finding.referable else "do not refer"
        sentence = (
            f"ICDR grade {finding.grade} ({finding.grade_name}); {refer} (P(referable) {finding.p_referable:.3f})."
        )
        if finding.quality_warning:
            problems = ", ".join(r.replace("_", " ") for r in finding.reasons) or "low quality"
            sentence += f" Graded despite the photograph's quality ({problems}): read it with care."
        return sentence
    why = ", ".join(r.replace("_", " ") for r in finding.reasons) or "no reason given"
    if finding.status == "error":
        return f"Not graded: the image could not be read ({why}). {finding.message}".strip()
    return f"Not graded: the photograph is {finding.status.replace('_', ' ')} ({why}); a person must review it."


def build_sr(
    source: Dataset,
    finding: EyeFinding,
    algorithm: AlgorithmInfo,
    *,
    instance_number: int = 1,
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR for ``finding`` on the photograph ``source`` (its header is enough).

    Args:
        source: the source instance (pixel data not needed): patient, study and references are taken from it,
            each attribute only if valid (else left empty).
        finding: the outcome for that photograph.
        algorithm: the model that produced it.
        instance_number: Instance Number of the SR in its series.

    Raises:
        SourceNotReferenceableError: the source has no valid Study, Series or SOP Instance UID, or an unknown
            SOP class.
    """
    source = _evidence(source)
    # highdicom warns with the patient's name when it has one component ("John Doe"); nothing of it is logged.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_sr(source, finding, algorithm, instance_number)


def _build_sr(
    source: Dataset, finding: EyeFinding, algorithm: AlgorithmInfo, instance_number: int
) -> hd.sr.ComprehensiveSR:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid.generate_uid(_UID_PREFIX, entropy_srcs=["retinagrade-device", algorithm.model_sha256]),
        name=algorithm.name,
        manufacturer_name="retinagrade",
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    parameters = [f"model_sha256={algorithm.model_sha256}"]
    if algorithm.site_profile:
        parameters.append(f"site_profile={algorithm.site_profile}")
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=parameters, manufacturer="retinagrade"
    )
    sites: Sequence[hd.sr.FindingSite] | None = None
    if finding.laterality is not None:
        sites = [hd.sr.FindingSite(anatomic_location=_coded(EYE_SITE[finding.laterality]))]
    else:
        sites = [hd.sr.FindingSite(anatomic_location=_ENTIRE_EYE)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid.generate_uid(_UID_PREFIX, entropy_srcs=["retinagrade-group", str(source.SOPInstanceUID)]),
            identifier=f"retinagrade {finding.status}",
        ),
        finding_type=_coded(SEVERITY[finding.laterality]),
        algorithm_id=algorithm_id,
        finding_sites=sites,
        measurements=_measurements(finding) or None,
        qualitative_evaluations=_qualitative(finding),
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID))],
    )
    # The finding in words (TID 1501 allows a TEXT evaluation): what a reader sees first in a PACS viewer.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value=explanation(finding)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_coded(PROCEDURE),
        imaging_measurements=[group],
        title=_coded(REPORT_TITLE),
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=sr_series_uid(str(source.StudyInstanceUID)),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_instance_uid(str(source.SOPInstanceUID)),
        instance_number=instance_number,
        manufacturer="retinagrade",
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    # A Part 10 preamble even when a client serialises the SR itself (dicomweb-client's STOW does).
    sr.preamble = b"\0" * 128
    return sr


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (``application/dicom``)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def report_for_file(path: Path, record: RecordLike, algorithm: AlgorithmInfo) -> Dataset | None:
    """The SR for one graded file, when the file is DICOM with a readable header; None otherwise.

    Also for a DICOM file that could not be graded (several frames, an unsupported syntax): its SR says why.

    Raises:
        SourceNotReferenceableError: the header has no valid Study, Series or SOP Instance UID to reference.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
        if not is_dicom(head):
            return None
        header = read_dataset(path.read_bytes(), stop_before_pixels=True)
    except (OSError, InputError):
        return None
    finding = finding_from_record(record)
    if not finding.metadata:
        meta = dicom_metadata(header)
        finding = dataclasses.replace(finding, laterality=eye_of(meta), metadata=meta)
    return build_sr(header, finding, algorithm)
