"""``retinagrade grade`` on DICOM: .dcm and suffix-less PACS exports are found and graded exactly as their
JPEGs; ``--output results.fhir.json`` writes a valid Bundle; ``--output-sr`` writes one SR per DICOM input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")

import pydicom
from fhir.resources.R4B.bundle import Bundle

from retinagrade.cli import app
from retinagrade.interop.dicom_sr import sr_instance_uid
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom, to_bytes, wrap_jpeg

runner = CliRunner()
PHOTOS = ("16_right.jpeg", "373_left.jpeg", "6834_left.jpeg")


@pytest.fixture
def exported(
    tmp_path: Path, right_eye_photo: Path, left_eye_photo: Path, dark_fundus_photo: Path
) -> tuple[Path, Path, dict[str, pydicom.Dataset]]:
    """The camera JPEGs, and the same photos as a PACS export (one .dcm, the others without a suffix)."""
    jpegs, pacs = tmp_path / "jpegs", tmp_path / "pacs"
    jpegs.mkdir()
    (pacs / "sub").mkdir(parents=True)
    instances = {}
    sources = dict(zip(PHOTOS, (right_eye_photo, left_eye_photo, dark_fundus_photo), strict=True))
    for index, name in enumerate(PHOTOS):
        data = sources[name].read_bytes()
        (jpegs / name).write_bytes(data)
        side = "L" if "left" in name else "R"
        ds = wrap_jpeg(data, PhotoIdentity(f"PAT-{name.split('_')[0]}", "Test^Patient", side))  # type: ignore[arg-type]
        target = pacs / f"{Path(name).stem}.dcm" if index == 0 else pacs / "sub" / f"IM{index:06d}"
        target.write_bytes(to_bytes(ds))
        instances[name] = ds
    (pacs / "README").write_text("not a DICOM file, no suffix: skipped")
    multi = pixels_to_dicom(np.zeros((16, 16, 3), np.uint8), PhotoIdentity("PAT-X", "", "R"))
    multi.NumberOfFrames = 2
    multi.PixelData = bytes(16 * 16 * 3 * 2)
    (pacs / "sub" / "IM999999").write_bytes(to_bytes(multi))
    instances["multi"] = multi
    return jpegs, pacs, instances


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_dicom_exports_grade_exactly_as_their_jpegs(exported, tmp_path: Path, model_path: Path) -> None:
    jpegs, pacs, instances = exported
    args = ["--model", str(model_path), "--quiet"]
    done = runner.invoke(app, ["grade", str(jpegs), "--output", str(tmp_path / "j.json"), *args])
    assert done.exit_code == 0, done.output
    fhir_out, sr_dir = tmp_path / "r.fhir.json", tmp_path / "sr"
    done = runner.invoke(
        app,
        ["grade", str(pacs), "--output", str(tmp_path / "d.json"), "--output-sr", str(sr_dir), *args],
    )
    assert done.exit_code == 1, done.output  # the two-frame instance is an error row
    by_jpeg = {Path(r["image"]).stem: r for r in _rows(tmp_path / "j.json")}
    rows = _rows(tmp_path / "d.json")
    assert len(rows) == len(PHOTOS) + 1  # README skipped
    graded = [r for r in rows if r["status"] != "error"]
    (error,) = [r for r in rows if r["status"] == "error"]
    assert error["error_code"] == "multi_frame_not_supported"
    assert error["metadata"]["PatientID"] == "PAT-X"  # the header was read: whose photo it is still counts
    for row in graded:
        sop = row["metadata"]["SOPInstanceUID"]
        (name,) = [n for n, ds in instances.items() if ds.SOPInstanceUID == sop]
        twin = by_jpeg[Path(name).stem]
        for key in ("status", "grade", "referable", "p0", "p1", "p2", "p3", "p4", "quality", "reasons"):
            assert row[key] == twin[key], (name, key)
        assert row["metadata"]["ImageLaterality"] == ("L" if "left" in name else "R")
    # One SR per DICOM input, the unreadable one included, each named by its derived UID.
    written = sorted(p.name for p in sr_dir.iterdir())
    assert written == sorted(f"{sr_instance_uid(ds.SOPInstanceUID)}.dcm" for ds in instances.values())
    for path in sr_dir.iterdir():
        sr = pydicom.dcmread(path)
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID in {ds.SOPInstanceUID for ds in instances.values()}

    done = runner.invoke(app, ["grade", str(pacs), "--output", str(fhir_out), *args])
    assert done.exit_code == 1, done.output
    bundle = json.loads(fhir_out.read_text())
    Bundle.model_validate(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    dr = [o for o in observations if o["code"]["coding"][0]["system"] == "http://loinc.org"]
    oedema = [o for o in observations if o["code"]["coding"][0]["code"] == "312912001"]
    # one DR Observation per photo; an oedema one per graded photo when the model has that output
    assert len(dr) == len(PHOTOS) + 1 and len(dr) + len(oedema) == len(observations) and len(oedema) <= len(dr)
    assert kinds.count("Device") == 1
    assert kinds.count("Patient") == len({ds.PatientID for ds in instances.values()})


def test_pair_eyes_uses_dicom_patient_and_laterality(
    tmp_path: Path, right_eye_photo: Path, left_eye_photo: Path, model_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for index, (photo, side) in enumerate(((right_eye_photo, "R"), (left_eye_photo, "L"))):
        # Names that say nothing: only the DICOM header knows whose eye it is.
        ds = wrap_jpeg(photo.read_bytes(), PhotoIdentity("PAIRED-77", "", side))  # type: ignore[arg-type]
        (folder / f"IM{index:04d}").write_bytes(to_bytes(ds))
    done = runner.invoke(
        app, ["grade", str(folder), "--pair-eyes", "--model", str(model_path), "--quiet", "-o", str(tmp_path / "r.csv")]
    )
    assert done.exit_code == 0, done.output
    rows = [line for line in done.stdout.splitlines() if "PAIRED-77" in line]
    assert len(rows) == 1  # one patient, both eyes
    assert "left" in done.stdout and "right" in done.stdout
    assert "refer" in rows[0] or "no_refer" in rows[0]


def test_an_sr_written_under_a_site_profile_names_it(exported, tmp_path: Path, model_path: Path) -> None:
    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.inference.site_profile import SiteProfile

    _, pacs, _ = exported
    spec = ModelSpec.load(model_path)
    profile = SiteProfile(
        name="clinic-north",
        model_sha256=spec.sha256,
        created="2026-12-01",
        temperature=spec.temperature,
        referable_threshold=spec.referable_threshold,
    ).save(tmp_path / "site.json")
    sr_dir = tmp_path / "sr"
    done = runner.invoke(
        app,
        ["grade", str(pacs), "--model", str(model_path), "--quiet", "--site", str(profile), "--output-sr", str(sr_dir)],
    )
    assert done.exit_code == 1, done.output  # the two-frame instance is an error row
    reports = list(sr_dir.iterdir())
    assert reports and all(b"site_profile=clinic-north" in path.read_bytes() for path in reports)
