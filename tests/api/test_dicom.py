"""DICOM through the service: application/dicom uploads grade as their JPEGs, FHIR and SR answers by Accept,
the batch uses DICOM laterality and patient id, bad DICOM is a clear 4xx, and no patient id reaches a log."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")

import pydicom
from fhir.resources.R4B.bundle import Bundle
from pydicom import uid
from pydicom.data import get_testdata_file

from retinagrade.api.interop import FHIR_EXAMPLE
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom, to_bytes, wrap_jpeg

PATIENT = "PAT-API-2024"


@pytest.fixture(scope="module")
def pair(right_eye_photo: Path, left_eye_photo: Path) -> dict[str, tuple[bytes, pydicom.Dataset]]:
    """One patient's right and left eye: JPEGs and the OP instances wrapping them, as a camera stores them."""
    study = uid.generate_uid()
    out = {}
    for side, path in (("R", right_eye_photo), ("L", left_eye_photo)):
        jpeg = path.read_bytes()
        out[side] = (jpeg, wrap_jpeg(jpeg, PhotoIdentity(PATIENT, "Api^Patient", side, study)))  # type: ignore[arg-type]
    return out


def _dicom(client: TestClient, data: bytes, accept: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/dicom"}
    if accept:
        headers["Accept"] = accept
    return client.post("/v1/grade", content=data, headers=headers)


def test_dicom_upload_grades_as_its_jpeg_and_carries_its_identifiers(client: TestClient, pair) -> None:
    jpeg, ds = pair["R"]
    from_jpeg = client.post("/v1/grade", content=jpeg, headers={"Content-Type": "image/jpeg"}).json()
    answer = _dicom(client, to_bytes(ds))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    for key in ("status", "grade", "referable", "probabilities", "p_referable", "quality"):
        assert body[key] == from_jpeg[key], key
    assert body["metadata"]["SOPInstanceUID"] == ds.SOPInstanceUID
    assert body["metadata"]["ImageLaterality"] == "R"
    assert from_jpeg["metadata"] == {}
    # As a multipart file too.
    multipart = client.post("/v1/grade", files={"file": ("eye.dcm", to_bytes(ds), "application/dicom")})
    assert multipart.json()["probabilities"] == body["probabilities"]


def test_fhir_answer_validates(client: TestClient, pair) -> None:
    _, ds = pair["L"]
    answer = _dicom(client, to_bytes(ds), accept="application/fhir+json")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    bundle = answer.json()
    Bundle.model_validate(bundle)
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    (obs,) = [o for o in observations if o["code"]["coding"][0]["system"] == "http://loinc.org"]
    assert obs["bodySite"]["coding"][0]["code"] == "362503005"
    assert obs["code"]["coding"][0]["code"] == "71490-7"
    # A model with an oedema output adds its own Observation for the eye; one without adds none
    measured = _dicom(client, to_bytes(ds)).json()["p_dme"] is not None
    oedema = [o for o in observations if o["code"]["coding"][0]["code"] == "312912001"]
    assert len(oedema) == int(measured) and len(observations) == 1 + int(measured)


def test_sr_answer_for_dicom_input_and_406_for_a_jpeg(client: TestClient, pair) -> None:
    jpeg, ds = pair["R"]
    answer = _dicom(client, to_bytes(ds), accept="application/dicom")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(answer.content))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert sr.PatientID == PATIENT and sr.StudyInstanceUID == ds.StudyInstanceUID
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert "111001" in str(sr) and "retinagrade" in str(sr)
    refused = client.post(
        "/v1/grade", content=jpeg, headers={"Content-Type": "image/jpeg", "Accept": "application/dicom"}
    )
    assert refused.status_code == 406 and refused.json()["code"] == "not_acceptable"
    # A preference list falls back to what can be given.
    mixed = client.post(
        "/v1/grade", content=jpeg, headers={"Content-Type": "image/jpeg", "Accept": "application/xml, */*;q=0.1"}
    )
    assert mixed.status_code == 200 and mixed.json()["status"]


def test_batch_uses_dicom_laterality_and_patient_and_answers_fhir(client: TestClient, pair) -> None:
    files = [("files", (f"{side}.dcm", to_bytes(ds), "application/dicom")) for side, (_, ds) in pair.items()]
    answer = client.post("/v1/grade/batch", files=files)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [item["eye"] for item in body["items"]] == ["right", "left"]
    assert {item["patient_id"] for item in body["items"]} == {PATIENT}
    (patient,) = body["patients"]
    assert patient["patient_id"] == PATIENT
    assert {eye["eye"] for eye in patient["eyes"]} == {"left", "right"}
    assert patient["decision"] in ("refer", "no_refer")  # both eyes known: decided

    fhir = client.post("/v1/grade/batch", files=files, headers={"Accept": "application/fhir+json"})
    assert fhir.status_code == 200, fhir.text
    bundle = fhir.json()
    Bundle.model_validate(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    # the DR grade, and oedema when the model has that output
    per_eye = 2 if _dicom(client, to_bytes(pair["R"][1])).json()["p_dme"] is not None else 1
    assert kinds.count("DiagnosticReport") == 1 and kinds.count("Observation") == 2 * per_eye
    assert kinds.count("Patient") == 1
    sr = client.post("/v1/grade/batch", files=files, headers={"Accept": "application/dicom"})
    assert sr.status_code == 406


def _bad_dicom() -> dict[str, bytes]:
    rgb = np.zeros((48, 64, 3), np.uint8)
    no_pixels = pixels_to_dicom(rgb, PhotoIdentity(PATIENT))
    del no_pixels.PixelData
    video = pixels_to_dicom(rgb, PhotoIdentity(PATIENT))
    video.file_meta.TransferSyntaxUID = uid.MPEG4HP41
    video.PixelData = pydicom.encaps.encapsulate([bytes(64)])
    whole = to_bytes(pixels_to_dicom(rgb, PhotoIdentity(PATIENT), uid.RLELossless))
    return {
        "no pixel data": to_bytes(no_pixels),
        "unsupported transfer syntax": to_bytes(video),
        "CT image": Path(get_testdata_file("CT_small.dcm")).read_bytes(),  # type: ignore[arg-type]
        "truncated": whole[: len(whole) // 2],
    }


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no pixel data", 422, "dicom_no_pixel_data"),
        ("unsupported transfer syntax", 415, "dicom_unsupported_transfer_syntax"),
        ("CT image", 422, "dicom_not_photograph"),
        ("truncated", 400, "corrupt_image"),
    ],
)
def test_bad_dicom_is_a_clear_4xx(client: TestClient, case: str, status: int, code: str) -> None:
    answer = _dicom(client, _bad_dicom()[case])
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code
    assert answer.json()["message"]


def test_no_patient_id_in_the_logs(client: TestClient, pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, ds = pair["R"]
    for accept in (None, "application/fhir+json", "application/dicom"):
        assert _dicom(client, to_bytes(ds), accept=accept).status_code == 200
    _dicom(client, _bad_dicom()["truncated"])
    assert caplog.records, "the service logs its requests"
    assert PATIENT not in caplog.text and "Api^Patient" not in caplog.text


def test_openapi_shows_fhir_and_sr_answers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    single = spec["paths"]["/v1/grade"]["post"]
    content = single["responses"]["200"]["content"]
    assert {"application/json", "application/fhir+json", "application/dicom"} <= set(content)
    assert "application/dicom" in single["requestBody"]["content"]
    assert "application/fhir+json" in spec["paths"]["/v1/grade/batch"]["post"]["responses"]["200"]["content"]
    Bundle.model_validate(FHIR_EXAMPLE)  # the documented example is a valid Bundle


def test_a_dicom_over_the_decode_budget_is_413(make_settings) -> None:  # type: ignore[no-untyped-def]
    from retinagrade.api.app import create_app

    # 1200 x 1000 RGB, 16 bits: ~19 MiB to decode, over a 4 MiB budget; the header alone says so.
    ds = pixels_to_dicom(np.zeros((1000, 1200, 3), np.uint8), PhotoIdentity(PATIENT), bits=16)
    with TestClient(create_app(make_settings(max_decoded_bytes=4 * 1024 * 1024))) as small:
        answer = _dicom(small, to_bytes(ds))
    assert answer.status_code == 413, answer.text
    assert answer.json()["code"] == "image_too_large"
