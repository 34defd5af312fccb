"""Hostile and non-conformant DICOM through the service (issue 20 B): damaged headers, decompression bombs,
frames that are not what the header says, and headers FHIR and DICOM SR cannot copy as they are. Every Accept
type answers a 2xx or a clear 4xx, never a 5xx, and a bad file never costs the other images of a batch."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")

import pydicom
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset

from retinagrade.api.app import create_app
from retinagrade.api.audit import AuditStore
from retinagrade.api.settings import Settings
from retinagrade.interop.photo import PhotoIdentity, to_bytes, wrap_jpeg

ACCEPTS = ("application/json", "application/fhir+json", "application/dicom")
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
UNDEFINED = b"\xff\xff\xff\xff"


@pytest.fixture
def camera_jpeg(synthetic_fundus: Callable[..., np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_fundus(320, 240, 160, 120, 110)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def camera_instance(camera_jpeg: bytes) -> Callable[[], Dataset]:
    """Factory: a camera's OP instance of the synthetic fundus, a new one (new UIDs) each call."""
    return lambda: wrap_jpeg(camera_jpeg, PhotoIdentity("PAT-0001", "Doe^John", "R"))


def nested_sequences(depth: int) -> bytes:
    opening = struct.pack("<HH", 0x0040, 0x0555) + b"SQ\x00\x00" + UNDEFINED + b"\xfe\xff\x00\xe0" + UNDEFINED
    leaf = struct.pack("<HH", 0x0008, 0x0100) + b"SH\x02\x001 "
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return opening * depth + leaf + closing * depth


def before_pixels(data: bytes, extra: bytes) -> bytes:
    at = data.index(PIXEL_DATA_TAG)
    return data[:at] + extra + data[at:]


def post_dicom(client: TestClient, data: bytes, accept: str) -> object:
    return client.post("/v1/grade", content=data, headers={"Content-Type": "application/dicom", "Accept": accept})


@pytest.mark.parametrize("accept", ACCEPTS)
def test_a_damaged_header_is_400_on_every_accept_type(
    client: TestClient, camera_instance: Callable[[], Dataset], accept: str
) -> None:
    damaged = before_pixels(to_bytes(camera_instance()), nested_sequences(250))
    answer = post_dicom(client, damaged, accept)
    assert answer.status_code == 400, answer.text  # type: ignore[attr-defined]
    assert answer.json()["code"] == "corrupt_image"  # type: ignore[attr-defined]


def test_a_damaged_file_costs_a_batch_nothing_but_its_own_answer(
    client: TestClient, camera_instance: Callable[[], Dataset], camera_jpeg: bytes
) -> None:
    damaged = before_pixels(to_bytes(camera_instance()), nested_sequences(250))
    files = [
        ("files", ("good.jpg", camera_jpeg, "image/jpeg")),
        ("files", ("damaged.dcm", damaged, "application/dicom")),
        ("files", ("good.dcm", to_bytes(camera_instance()), "application/dicom")),
    ]
    for accept in ACCEPTS[:2]:
        answer = client.post("/v1/grade/batch", files=files, headers={"Accept": accept})
        assert answer.status_code == 200, answer.text
    items = client.post("/v1/grade/batch", files=files).json()["items"]
    assert items[1]["error"]["code"] == "corrupt_image"
    assert items[0]["result"] is not None and items[2]["result"] is not None


def test_an_unforeseen_failure_on_one_image_of_a_batch_is_its_own_error(
    client: TestClient, camera_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retinagrade.pipeline import GradingPipeline

    prepare = GradingPipeline.prepare

    def tripping(self: GradingPipeline, data: bytes) -> object:
        if data.endswith(b"TRIP"):
            raise RecursionError("maximum recursion depth exceeded")
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", tripping)
    files = [("files", (name, camera_jpeg + tail, "image/jpeg")) for name, tail in (("a", b""), ("b", b"TRIP"))]
    answer = client.post("/v1/grade/batch", files=files)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["items"]
    assert first["result"]["status"] in ("graded", "ungradable", "not_fundus")
    assert second["error"]["code"] == "internal_error" and second["result"] is None


# -- B.4: an SR (and FHIR) for ordinary camera DICOM, and only delivered answers audited ----------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", None),
        ("PatientSex", None),
        ("StudyDate", None),
        ("StudyTime", None),
        ("AccessionNumber", None),
        ("StudyID", None),
        ("PatientName", None),
        ("PatientID", None),
        ("PatientBirthDate", "1960-03-17"),
        ("PatientSex", "male"),
        ("StudyTime", "25:99"),
        ("SpecificCharacterSet", "ISO 2022 IR 87"),
    ],
)
def test_an_sr_answers_ordinary_camera_dicom(
    client: TestClient, camera_instance: Callable[[], Dataset], keyword: str, value: str | None
) -> None:
    ds = camera_instance()
    if value is None:
        if keyword in ds:
            del ds[keyword]
    elif keyword in ds:
        ds[keyword].value = value
    else:
        setattr(ds, keyword, value)
    for accept in ACCEPTS:
        answer = post_dicom(client, to_bytes(ds), accept)
        assert answer.status_code == 200, (accept, answer.text)  # type: ignore[attr-defined]
    sr = pydicom.dcmread(io.BytesIO(answer.content))  # type: ignore[attr-defined]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.StudyInstanceUID == ds.StudyInstanceUID


def test_an_answer_that_cannot_be_rendered_is_neither_delivered_nor_audited(
    make_settings: Callable[..., Settings], camera_instance: Callable[[], Dataset]
) -> None:
    ds = camera_instance()
    del ds.SeriesInstanceUID  # no SR can reference the photograph
    settings = make_settings()
    with TestClient(create_app(settings)) as fresh:
        refused = post_dicom(fresh, to_bytes(ds), "application/dicom")
        delivered = post_dicom(fresh, to_bytes(ds), "application/json")
    assert refused.status_code == 406, refused.text  # type: ignore[attr-defined]
    assert refused.json()["code"] == "not_acceptable"  # type: ignore[attr-defined]
    assert delivered.status_code == 200  # type: ignore[attr-defined]
    store = AuditStore(settings.audit_path)
    try:
        rows = store.records()
    finally:
        store.close()
    assert [row["request_id"] for row in rows] == [delivered.json()["request_id"]]  # type: ignore[attr-defined]


# -- B.8: FHIR answers for identifiers that break FHIR's patterns -------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SeriesInstanceUID", "abc.def_ghi"), ("SOPInstanceUID", "abc.def_ghi"), ("Modality", "O  P")],
)
def test_fhir_answers_whatever_the_identifiers_look_like(
    client: TestClient, camera_instance: Callable[[], Dataset], keyword: str, value: str
) -> None:
    ds = camera_instance()
    ds[keyword].value = value
    single = post_dicom(client, to_bytes(ds), "application/fhir+json")
    assert single.status_code == 200, single.text  # type: ignore[attr-defined]
    Bundle.model_validate(single.json())  # type: ignore[attr-defined]
    files = [("files", ("eye.dcm", to_bytes(ds), "application/dicom"))]
    batch = client.post("/v1/grade/batch", files=files, headers={"Accept": "application/fhir+json"})
    assert batch.status_code == 200, batch.text
    Bundle.model_validate(batch.json())
