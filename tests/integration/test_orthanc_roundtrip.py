"""End to end against a real PACS: Debian's Orthanc with its DICOMweb plugin, started here on loopback.

Camera JPEGs (the raw samples of ../shared/data, else the photos of tests/fixtures) are wrapped as OP
instances (encapsulated JPEG baseline, the camera's bytes) and uploaded; ``retinagrade dicomweb`` is
started, killed once it has stored its first report, and started again. Afterwards the PACS must hold
exactly one SR per photograph, each referencing its photograph and carrying the grade the JPEG file gets;
an instance that cannot be graded has an SR that says why; the command's log never names a patient.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom", reason="needs the [dicom] extra (pydicom)")
pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("dicomweb_client", reason="needs the [dicom] extra (dicomweb-client)")

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from retinagrade.interop.dicom_sr import SR_SERIES_DESCRIPTION
from retinagrade.interop.dicomweb import make_session
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom, wrap_jpeg

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
ORTHANC_REASON = "needs Debian's orthanc and orthanc-dicomweb packages (apt-get install orthanc orthanc-dicomweb)"
USER, PASSWORD = "grader", "s3cret-pw"
PATIENT_NAMES = {"PAT-RT-0001": "Roundtrip^Alice", "PAT-RT-0002": "Roundtrip^Bob", "PAT-RT-0003": "Roundtrip^Carol"}


def _plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for candidate in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Orthanc on loopback with DICOMweb, basic auth and a temporary store; yields its DICOMweb URL."""
    plugin = _plugin()
    if not Path(ORTHANC).is_file() or plugin is None:
        pytest.skip(ORTHANC_REASON)
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "retinagrade-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/dicom-web"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/studies", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url, session=make_session(f"{USER}:{PASSWORD}"))


def _command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "retinagrade.cli", "dicomweb", "--url", url, "--auth", f"{USER}:{PASSWORD}", *extra]


def _reports(client: DICOMwebClient) -> list[pydicom.Dataset]:
    found = client.search_for_instances(search_filters={"Modality": "SR"})
    reports = []
    for item in found:
        study, series, sop = (item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        reports.append(client.retrieve_instance(study, series, sop))
    return reports


def _codes(report: pydicom.Dataset) -> dict[str, str]:
    """Concept name code -> value code (or number / text) for every item of the measurement group."""
    out: dict[str, str] = {}

    def code(item: pydicom.Dataset) -> str:
        # Codes longer than 16 characters travel as Long Code Value.
        return str(item.get("CodeValue") or item.get("LongCodeValue"))

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            name = code(item.ConceptNameCodeSequence[0]) if "ConceptNameCodeSequence" in item else ""
            if "ConceptCodeSequence" in item:
                out.setdefault(name, code(item.ConceptCodeSequence[0]))
                if name == "ungraded-reason":
                    out[f"reason:{code(item.ConceptCodeSequence[0])}"] = "1"
            elif "MeasuredValueSequence" in item:
                out[name] = str(item.MeasuredValueSequence[0].NumericValue)
            elif "TextValue" in item:
                out[name] = str(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(report.ContentSequence)
    return out


def _referenced_sop(report: pydicom.Dataset) -> str:
    return str(
        report.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
    )


def test_round_trip_grades_each_photo_once_and_survives_a_kill(
    orthanc: str, fundus_photos: list[Path], dark_fundus_photo: Path, grading_pipeline, tmp_path: Path
) -> None:
    client = _client(orthanc)
    photos = [*fundus_photos, dark_fundus_photo]  # graded eyes and one that is too dark to grade
    expected: dict[str, tuple[str, int | None]] = {}  # SOP instance UID -> (status, grade) of the JPEG file
    uploads = []
    for index, path in enumerate(photos):
        patient = sorted(PATIENT_NAMES)[index % len(PATIENT_NAMES)]
        side = "L" if "left" in path.name else "R"
        jpeg = path.read_bytes()
        ds = wrap_jpeg(jpeg, PhotoIdentity(patient, PATIENT_NAMES[patient], side, instance_number=index + 1))
        result = grading_pipeline.grade(jpeg)
        expected[str(ds.SOPInstanceUID)] = (result.status, result.decision.grade if result.decision else None)
        uploads.append(ds)
    # A two-frame instance cannot be graded: it must still get an SR that says why.
    rgb = np.zeros((64, 64, 3), np.uint8)
    multi = pixels_to_dicom(rgb, PhotoIdentity("PAT-RT-0001", PATIENT_NAMES["PAT-RT-0001"], "R"))
    multi.NumberOfFrames = 2
    multi.PixelData = np.stack([rgb, rgb]).tobytes()
    expected[str(multi.SOPInstanceUID)] = ("error", None)
    uploads.append(multi)
    client.store_instances(uploads)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = []
    # First run: watch mode, killed (SIGKILL, no clean-up) as soon as one report is in the PACS.
    first = subprocess.Popen(
        _command(orthanc, "--watch", "0.5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not client.search_for_instances(search_filters={"Modality": "SR"}):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no report stored within 240 s"
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        out, errors = first.communicate(timeout=30)
        logs.append(out + errors)
    stored_before = len(client.search_for_instances(search_filters={"Modality": "SR"}))
    assert 1 <= stored_before <= len(expected)

    # Second run: one pass; does the rest and nothing twice.
    second = subprocess.run(_command(orthanc), capture_output=True, text=True, env=env, timeout=600)
    logs.append(second.stdout + second.stderr)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["found"] == len(expected)
    assert summary["already_done"] >= stored_before
    assert summary["already_done"] + summary["graded"] + summary["not_graded"] == len(expected)

    # Third run: nothing left to do.
    third = subprocess.run(_command(orthanc), capture_output=True, text=True, env=env, timeout=600)
    logs.append(third.stdout + third.stderr)
    assert json.loads(third.stdout.strip().splitlines()[-1])["already_done"] == len(expected)

    reports = _reports(client)
    by_source = {}
    for report in reports:
        assert report.SeriesDescription == SR_SERIES_DESCRIPTION
        source = _referenced_sop(report)
        assert source not in by_source, "two reports for one photograph"
        by_source[source] = report
    assert set(by_source) == set(expected)

    uploaded = {str(ds.SOPInstanceUID): ds for ds in uploads}
    for sop, (status, grade) in expected.items():
        report, source = by_source[sop], uploaded[sop]
        # Filed beside the photo: same patient and study.
        assert report.PatientID == source.PatientID
        assert report.StudyInstanceUID == source.StudyInstanceUID
        codes = _codes(report)
        assert codes["111001"] == grading_pipeline.spec.name  # Algorithm Name
        assert codes["111003"] == grading_pipeline.spec.version  # Algorithm Version
        if status == "graded":
            severity = "71490-7" if source.ImageLaterality == "L" else "71491-5"
            answers = ["LA18643-9", "LA18644-7", "LA18645-4", "LA18646-2", "LA18648-8"]
            assert codes[severity] == answers[grade]  # type: ignore[index]
            assert codes["gradable"] == "373066001"
        else:
            assert codes["gradable"] == "373067005"
            assert any(key.startswith("reason:") for key in codes)
            assert codes["121071"].startswith("Not graded")
    assert "reason:multi_frame_not_supported" in _codes(by_source[str(multi.SOPInstanceUID)])

    # The log names instances by a hash; never a patient id or name.
    text = "\n".join(logs)
    assert "report stored" in text
    for patient_id, name in PATIENT_NAMES.items():
        assert patient_id not in text
        assert name.split("^")[0] not in text


def test_wrong_credentials_are_a_clear_failure(orthanc: str) -> None:
    command = [sys.executable, "-m", "retinagrade.cli", "dicomweb", "--url", orthanc, "--auth", "grader:wrong"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4
    assert "401" in done.stderr


def test_unreachable_pacs_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    command = [sys.executable, "-m", "retinagrade.cli", "dicomweb", "--url", url, "--retries", "2", "--backoff", "0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4
    assert done.stderr.count("retry") == 2
    assert "did not answer" in done.stderr


def test_sr_parses_standalone(orthanc: str) -> None:
    """Every stored report is a valid Part 10 file pydicom reads back on its own."""
    client = _client(orthanc)
    for report in _reports(client):
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert again.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
