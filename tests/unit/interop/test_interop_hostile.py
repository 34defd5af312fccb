"""DICOM SR and FHIR for ordinary, imperfect camera DICOM (issue 20 B): built from what the instance has, bad or
missing patient and study attributes left empty or out, never a failure."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")

import pydicom
from pydicom.dataset import Dataset

from retinagrade.interop.dicom_sr import SourceNotReferenceableError, build_sr, sr_bytes
from retinagrade.interop.findings import AlgorithmInfo, EyeFinding
from retinagrade.interop.photo import PhotoIdentity, to_bytes, wrap_jpeg
from retinagrade.preprocessing.dicom import read_dataset

ALGORITHM = AlgorithmInfo("retinagrade-dr", "0.2.0", "ab" * 32, "Decision support only.")
GRADED = EyeFinding("graded", "R", grade=2, referable=True, p_referable=0.8, quality_score=0.9, gradable=True)


@pytest.fixture
def camera_instance(synthetic_fundus: Callable[..., np.ndarray]) -> Callable[..., Dataset]:
    """Factory: a camera's OP instance with attributes changed (``None`` deletes one)."""
    buffer = io.BytesIO()
    Image.fromarray(synthetic_fundus(160, 120, 80, 60, 55)).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()

    def build(**changes: object) -> Dataset:
        ds = wrap_jpeg(jpeg, PhotoIdentity("PAT-0001", "Doe^John", "R", accession_number="ACC-1"))
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID = "19600317", "M", "S1"
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return ds

    return build


def header(ds: Dataset) -> Dataset:
    """The header as the service reads it from the uploaded bytes."""
    return read_dataset(to_bytes(ds), stop_before_pixels=True)


def reread(sr: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(sr_bytes(sr)))


MISSING = [
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "PatientName",
    "PatientID",
    "ReferringPhysicianName",
]


@pytest.mark.parametrize("keyword", MISSING)
def test_an_sr_is_built_for_an_instance_without_an_attribute(camera_instance, keyword: str) -> None:
    source = header(camera_instance(**{keyword: None}))
    sr = reread(build_sr(source, GRADED, ALGORITHM))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.get(keyword, "") in ("", None)  # left empty: never invented
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    for kept in ("PatientID", "AccessionNumber", "StudyID"):
        if kept != keyword:
            assert sr.get(kept) == source.get(kept), kept


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", "1960-03-17"),
        ("PatientBirthDate", "19601399"),
        ("PatientSex", "male"),
        ("StudyTime", "25:99"),
        ("StudyDate", "2024-01-02"),
        ("PatientID", "X" * 80),
    ],
)
def test_an_invalid_value_is_left_empty_and_the_rest_is_kept(camera_instance, keyword: str, value: str) -> None:
    ds = camera_instance()
    ds[keyword].value = value  # as a camera wrote it (pydicom would refuse it as an attribute)
    source = header(ds)
    sr = reread(build_sr(source, GRADED, ALGORITHM))
    assert sr.get(keyword, "") in ("", None)
    assert sr.AccessionNumber == "ACC-1" and sr.StudyInstanceUID == source.StudyInstanceUID
    if keyword != "PatientID":
        assert sr.PatientID == "PAT-0001"


def test_a_single_name_without_a_caret_is_kept_and_never_printed(camera_instance, caplog) -> None:
    source = header(camera_instance(PatientName="John Doe"))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = reread(build_sr(source, GRADED, ALGORITHM))
    assert str(sr.PatientName) == "John Doe"
    # highdicom warns with the name (printed on the server's stderr), and logs the SOP Instance UID.
    assert not [w for w in caught if "John Doe" in str(w.message)]
    assert "John Doe" not in caplog.text


@pytest.mark.parametrize(
    "charset", ["ISO 2022 IR 87", ["", "ISO 2022 IR 87"], "ISO_IR 100", "GB18030", "NOT A CHARSET"]
)
def test_any_character_set_gives_an_sr_with_the_names_readable(camera_instance, charset: object) -> None:
    ds = camera_instance(SpecificCharacterSet=charset)
    if isinstance(charset, list):
        ds.PatientName = "Yamada^Tarou=山田^太郎"
    source = header(ds)
    sr = reread(build_sr(source, GRADED, ALGORITHM))
    assert str(sr.PatientName) == str(source.PatientName)
    assert sr.PatientID == "PAT-0001"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", None),
        ("StudyInstanceUID", None),
        ("SeriesInstanceUID", None),
        ("SOPInstanceUID", "abc.def_ghi"),
        ("StudyInstanceUID", "1." + "2" * 70),
    ],
)
def test_an_instance_that_cannot_be_referenced_is_said_so(camera_instance, keyword: str, value: str | None) -> None:
    ds = camera_instance()
    if value is None:
        del ds[keyword]
    else:
        ds[keyword].value = value
    with pytest.raises(SourceNotReferenceableError):
        build_sr(header(ds), GRADED, ALGORITHM)


def test_grade_output_sr_writes_what_it_can_and_never_stops_the_run(camera_instance, tmp_path, model_path) -> None:
    from typer.testing import CliRunner

    from retinagrade.cli import EXIT_FILE_ERRORS, app

    folder = tmp_path / "export"
    folder.mkdir()
    anonymised = camera_instance(PatientBirthDate=None, PatientSex=None, PatientName=None, StudyTime=None)
    loose = camera_instance()
    loose["PatientSex"].value, loose["PatientBirthDate"].value = "male", "1960-03-17"
    unreferenceable = camera_instance()
    del unreferenceable.SeriesInstanceUID
    for name, ds in (("a.dcm", anonymised), ("b.dcm", loose), ("c.dcm", unreferenceable)):
        (folder / name).write_bytes(to_bytes(ds))
    out, srs = tmp_path / "results.csv", tmp_path / "srs"
    result = CliRunner().invoke(
        app, ["grade", str(folder), "-o", str(out), "--output-sr", str(srs), "--model", str(model_path), "-q"]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == EXIT_FILE_ERRORS, result.output  # one file got no SR: said, and counted
    assert "c.dcm" in result.output and "SeriesInstanceUID" in result.output
    assert len(out.read_text().splitlines()) == 4  # header + every file graded
    written = sorted(srs.glob("*.dcm"))
    assert len(written) == 2
    assert {pydicom.dcmread(path).PatientSex for path in written} == {""}


# -- B.8: FHIR never fails for identifiers that break its id / code patterns ---------------------------------

META = {
    "PatientID": "PAT-9",
    "StudyInstanceUID": "1.2.3",
    "SeriesInstanceUID": "1.2.3.4",
    "SOPInstanceUID": "1.2.3.4.5",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "Modality": "OP",
}


def _bundle_for(meta: dict[str, str], name: str = "eye.dcm") -> dict:
    from fhir.resources.R4B.bundle import Bundle

    from retinagrade.interop.fhir import FhirItem, build_bundle

    finding = EyeFinding("graded", "R", grade=1, referable=False, p_referable=0.1, gradable=True, metadata=meta)
    bundle = build_bundle([FhirItem(name, finding)], ALGORITHM)
    Bundle.model_validate(bundle)
    return bundle


def _only(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.parametrize("value", ["abc.def_ghi", "1.2.03", "1." + "2" * 70, " 1.2.3", ""])
def test_an_invalid_sop_instance_uid_is_left_out_of_fhir(value: str) -> None:
    bundle = _bundle_for({**META, "SOPInstanceUID": value})
    (observation,) = _only(bundle, "Observation")
    assert "identifier" not in observation
    (study,) = _only(bundle, "ImagingStudy")
    assert "series" not in study  # a series is listed with its instances; none can be named


@pytest.mark.parametrize("value", ["abc.def_ghi", "1.2.3 4"])
def test_an_invalid_series_uid_leaves_its_series_out(value: str) -> None:
    (study,) = _only(_bundle_for({**META, "SeriesInstanceUID": value}), "ImagingStudy")
    assert "series" not in study
    assert study["identifier"][0]["value"] == "urn:oid:1.2.3"


def test_an_invalid_study_uid_gives_no_imaging_study_and_keeps_the_patient() -> None:
    bundle = _bundle_for({**META, "StudyInstanceUID": "abc.def_ghi"})
    assert _only(bundle, "ImagingStudy") == []
    assert _only(bundle, "Patient")[0]["identifier"][0]["value"] == "PAT-9"
    assert len(_only(bundle, "Observation")) == 1


@pytest.mark.parametrize(("value", "code"), [("O  P", "OP"), (" XC ", "XC"), ("op", "OP"), ("\x00", "OP"), ("", "OP")])
def test_a_modality_that_is_no_code_is_sanitised(value: str, code: str) -> None:
    (study,) = _only(_bundle_for({**META, "Modality": value}), "ImagingStudy")
    assert study["series"][0]["modality"]["code"] == code


def test_text_with_control_characters_is_made_valid() -> None:
    bundle = _bundle_for({**META, "PatientID": "PAT\x0b9"}, name="eye\x0c.dcm")
    assert _only(bundle, "Patient")[0]["identifier"][0]["value"] == "PAT 9"
    assert _only(bundle, "Observation")[0]["note"][0]["text"] == "Image: eye .dcm"


def test_grade_to_fhir_json_writes_a_valid_bundle_for_odd_identifiers(camera_instance, tmp_path, model_path) -> None:
    from fhir.resources.R4B.bundle import Bundle
    from typer.testing import CliRunner

    from retinagrade.cli import app

    ds = camera_instance()
    ds["SeriesInstanceUID"].value, ds["Modality"].value = "abc.def_ghi", "O  P"
    (tmp_path / "eye.dcm").write_bytes(to_bytes(ds))
    out = tmp_path / "x.fhir.json"
    result = CliRunner().invoke(app, ["grade", str(tmp_path / "eye.dcm"), "-o", str(out), "--model", str(model_path)])
    assert result.exit_code == 0, result.output
    Bundle.model_validate_json(out.read_text())
