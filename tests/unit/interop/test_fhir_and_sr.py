"""FHIR Bundle and DICOM SR built from real gradings: they validate, code what the issue asks for, and the SR
references its photograph and carries the patient and study attributes a PACS files it by."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")

import pydicom
from fhir.resources.R4B.bundle import Bundle

from retinagrade.errors import CorruptImageError
from retinagrade.interop.dicom_sr import build_sr, placeholder_source, sr_bytes, sr_instance_uid
from retinagrade.interop.fhir import FhirItem, build_bundle, validate
from retinagrade.interop.findings import AlgorithmInfo, EyeFinding, finding_from
from retinagrade.interop.photo import PhotoIdentity, to_bytes, wrap_jpeg
from retinagrade.preprocessing.dicom import decode_dicom, read_dataset

ALGORITHM = AlgorithmInfo("retinagrade-dr", "0.2.0", "ab" * 32, "Decision support only.", "clinic-a")
META = {
    "PatientID": "PAT-9",
    "StudyInstanceUID": "1.2.3",
    "SeriesInstanceUID": "1.2.3.4",
    "SOPInstanceUID": "1.2.3.4.5",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "Modality": "OP",
}


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _component(obs: dict, code: str) -> dict:
    (found,) = [c for c in obs["component"] if c["code"]["coding"][0]["code"] == code]
    return found


@pytest.fixture(scope="module")
def graded_pair(
    right_eye_photo: Path, left_eye_photo: Path, grading_pipeline
) -> list[tuple[str, EyeFinding, pydicom.Dataset]]:
    """Real photos of one patient's right and left eye, wrapped as OP, graded through DICOM input."""
    out = []
    study = pydicom.uid.generate_uid()
    for path, side in ((right_eye_photo, "R"), (left_eye_photo, "L")):
        name = path.name
        ds = wrap_jpeg(path.read_bytes(), PhotoIdentity("PAT-1", "Doe^Jane", side, study))  # type: ignore[arg-type]
        data = to_bytes(ds)
        result = grading_pipeline.grade(data)
        out.append(
            (name, finding_from(result, decode_dicom(data).metadata), read_dataset(data, stop_before_pixels=True))
        )
    return out


def test_bundle_for_a_patient_with_two_eyes(graded_pair) -> None:
    bundle = build_bundle([FhirItem(name, finding) for name, finding, _ in graded_pair], ALGORITHM)
    Bundle.model_validate(bundle)
    (report,) = _resources(bundle, "DiagnosticReport")
    everything = _resources(bundle, "Observation")
    observations = [o for o in everything if o["code"]["coding"][0]["system"] == "http://loinc.org"]
    oedema = [o for o in everything if o["code"]["coding"][0]["code"] == "312912001"]
    # the DR grade of each eye, and its oedema finding when the model measures it
    measured = sum(finding.p_dme is not None for _, finding, _ in graded_pair)
    assert len(observations) == 2 and len(oedema) == measured and len(report["result"]) == len(everything)
    (patient,) = _resources(bundle, "Patient")
    assert patient["identifier"][0]["value"] == "PAT-1"
    (study,) = _resources(bundle, "ImagingStudy")
    assert {i["uid"] for s in study["series"] for i in s["instance"]} == {ds.SOPInstanceUID for *_, ds in graded_pair}
    sites = {o["bodySite"]["coding"][0]["code"]: o for o in observations}
    assert set(sites) == {"362502000", "362503005"}  # right, left
    assert sites["362502000"]["code"]["coding"][0]["code"] == "71491-5"
    assert sites["362503005"]["code"]["coding"][0]["code"] == "71490-7"
    for obs, (_, finding, _) in zip(observations, graded_pair, strict=True):
        assert obs["status"] == "preliminary"
        if finding.status == "graded":
            answers = ["LA18643-9", "LA18644-7", "LA18645-4", "LA18646-2", "LA18648-8"]
            assert obs["valueCodeableConcept"]["coding"][0]["code"] == answers[finding.grade]  # type: ignore[index]
            p_referable = _component(obs, "p-referable-dr")["valueQuantity"]["value"]
            assert p_referable == pytest.approx(finding.p_referable, abs=5e-7)  # six decimals travel
            yes_no = "373066001" if finding.referable else "373067005"
            assert _component(obs, "referable-dr")["valueCodeableConcept"]["coding"][0]["code"] == yes_no
        else:
            assert "dataAbsentReason" in obs
    (device,) = _resources(bundle, "Device")
    assert device["version"][0]["value"] == "0.2.0"
    assert device["identifier"][0]["value"] == "ab" * 32
    assert device["property"][0]["valueCode"][0]["text"] == "clinic-a"
    assert "Decision support" in device["note"][0]["text"]


def test_ungradable_and_error_findings_say_why() -> None:
    ungradable = EyeFinding("ungradable", "L", quality_score=0.1, reasons=("too_dark", "blurred"), metadata=META)
    error = finding_from(CorruptImageError("damaged"), {})
    bundle = build_bundle([FhirItem("a.dcm", ungradable), FhirItem("b.jpg", error)], ALGORITHM)
    first, second = _resources(bundle, "Observation")
    assert first["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    reasons = [
        c["valueCodeableConcept"]["coding"][0]["code"]
        for c in first["component"]
        if c["code"]["coding"][0]["code"] == "ungraded-reason"
    ]
    assert reasons == ["too_dark", "blurred"]
    assert second["dataAbsentReason"]["coding"][0]["code"] == "error"
    # An untagged image (no patient, no study) gets its own report: two people are never mixed.
    assert len(_resources(bundle, "DiagnosticReport")) == 2
    conclusions = {r["conclusion"][:13] for r in _resources(bundle, "DiagnosticReport")}
    assert conclusions == {"Cannot decide"}


def test_validation_catches_a_malformed_resource() -> None:
    bundle = build_bundle(
        [FhirItem("a", EyeFinding("graded", "R", grade=0, referable=False, p_referable=0.1, gradable=True))], ALGORITHM
    )
    bundle["entry"][1]["resource"]["component"][0]["valueQuantity"] = {"value": "not a number"}
    with pytest.raises(ValueError):
        validate(bundle)


def test_sr_references_the_photo_and_names_the_algorithm(graded_pair) -> None:
    _, finding, source = graded_pair[0]
    data = sr_bytes(build_sr(source, finding, ALGORITHM))
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.Modality == "SR"
    assert sr.SOPInstanceUID == sr_instance_uid(source.SOPInstanceUID)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert (
        evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    text = str(sr)
    assert "Algorithm Name" in text and "111001" in text and "111003" in text
    assert "retinagrade-dr" in text
    if finding.status == "graded":
        assert "71491-5" in text  # right eye severity, coded


def test_sr_for_an_unreadable_photo_says_why() -> None:
    source = placeholder_source("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.77.1.5.1")
    finding = finding_from(CorruptImageError("The DICOM file is truncated and cannot be read."), {})
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(build_sr(source, finding, ALGORITHM))))
    text = str(sr)
    assert "corrupt_image" in text
    assert "373067005" in text  # gradable: no


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="needs DCMTK's dsrdump (Debian package dcmtk)")
def test_dcmtk_reads_the_sr_without_complaint(graded_pair, tmp_path: Path) -> None:
    """An independent toolkit parses the report as a Comprehensive SR and finds nothing to warn about."""
    _, finding, source = graded_pair[1]
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes(build_sr(source, finding, ALGORITHM)))
    done = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Comprehensive SR Document" in done.stdout
    assert "71490-7" in done.stdout and "Algorithm Name" in done.stdout
    assert not [line for line in done.stderr.splitlines() if line.startswith(("W:", "E:", "F:"))], done.stderr


def _risk_referred_eye_with_oedema() -> EyeFinding:
    """A grade-1 eye referred for its risk at the balanced point, with macular oedema found."""
    return EyeFinding(
        "graded",
        "L",
        grade=1,
        referable=True,
        referral_reason="risk",
        operating_point="balanced",
        referable_threshold=0.35,
        p_referable=0.41,
        probabilities=(0.3, 0.45, 0.15, 0.05, 0.05),
        p_dme=0.72,
        dme=True,
        quality_score=0.9,
        gradable=True,
        metadata=META,
    )


def test_fhir_words_a_risk_referral_names_its_point_and_reports_oedema_as_its_own_observation() -> None:
    finding = _risk_referred_eye_with_oedema()
    bundle = build_bundle([FhirItem("eye.dcm", finding, "PAT-9")], ALGORITHM)
    validate(bundle)
    severity, oedema = _resources(bundle, "Observation")
    assert severity["valueCodeableConcept"]["coding"][0]["code"] == "LA18644-7"  # mild: the grade is not rewritten
    assert _component(severity, "referral-reason")["valueCodeableConcept"]["coding"][0]["code"] == "refer-risk"
    assert _component(severity, "op-point")["valueString"] == "balanced"
    assert _component(severity, "risk-threshold")["valueQuantity"]["value"] == 0.35
    notes = " ".join(n["text"] for n in severity["note"])
    assert "Mild or no DR seen" in notes and "referred because the estimated risk of referable DR is 41%" in notes
    assert oedema["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "312912001",
        "display": "Macular edema due to diabetes mellitus",
    }
    assert oedema["valueCodeableConcept"]["coding"][0]["code"] == "373066001"  # yes
    assert _component(oedema, "p-dme")["valueQuantity"]["value"] == 0.72
    assert oedema["bodySite"]["coding"][0]["code"] == "362503005"  # left eye


def test_sr_carries_the_referral_reason_the_point_and_the_oedema_finding() -> None:
    finding = _risk_referred_eye_with_oedema()
    source = placeholder_source("1.2.3", "1.2.3.4", "1.2.3.4.5", META["SOPClassUID"])
    data = sr_bytes(build_sr(source, finding, ALGORITHM))
    text = str(pydicom.dcmread(io.BytesIO(data)))
    for code in ("refer-risk", "balanced", "312912001", "p-dme", "risk-threshold"):
        assert code in text, code
    # the finding in words, as a PACS viewer shows it
    assert b"referred because the estimated risk of referable DR is 41%" in data
