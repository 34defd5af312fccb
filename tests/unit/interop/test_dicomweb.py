"""The DICOMweb pass against an in-memory PACS: retries with backoff, once-only grading, reports for bad
instances, and logs that never name a patient. (tests/integration runs the same against a real Orthanc.)"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import requests

pytest.importorskip("dicomweb_client", reason="needs the [dicom] extra (dicomweb-client)")

import pydicom

from retinagrade.interop.dicom_sr import sr_instance_uid, sr_series_uid
from retinagrade.interop.dicomweb import PacsGrader, PacsUnavailableError
from retinagrade.interop.findings import AlgorithmInfo
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom

ALGORITHM = AlgorithmInfo("retinagrade-dr", "0.2.0", "cd" * 32)
PATIENT = "PAT-LOG-4711"


def _tag(ds: pydicom.Dataset) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [ds.StudyInstanceUID]},
        "0020000E": {"vr": "UI", "Value": [ds.SeriesInstanceUID]},
        "00080018": {"vr": "UI", "Value": [ds.SOPInstanceUID]},
        "00080016": {"vr": "UI", "Value": [ds.SOPClassUID]},
        "00080060": {"vr": "CS", "Value": [ds.Modality]},
    }


class FakePacs:
    """Just enough of DICOMwebClient; ``outages`` makes the next N calls fail with a connection error."""

    def __init__(self, instances: list[pydicom.Dataset]) -> None:
        self.instances = {str(ds.SOPInstanceUID): ds for ds in instances}
        self.stored: list[pydicom.Dataset] = []
        self.outages = 0
        self.calls = 0

    def set_http_retry_params(self, retry: bool = True) -> None:
        assert retry is False

    def _tick(self) -> None:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise requests.ConnectionError("connection refused")

    def _all(self) -> list[pydicom.Dataset]:
        return [*self.instances.values(), *self.stored]

    def search_for_series(self, search_filters: dict[str, str], limit: int, offset: int) -> list[dict[str, Any]]:
        self._tick()
        seen: dict[str, dict[str, Any]] = {}
        for ds in self._all():
            if ds.Modality == search_filters["Modality"]:
                seen.setdefault(str(ds.SeriesInstanceUID), _tag(ds))
        return list(seen.values())[offset : offset + limit]

    def search_for_instances(
        self, study_instance_uid: str, series_instance_uid: str, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        self._tick()
        found = [
            _tag(ds)
            for ds in self._all()
            if ds.StudyInstanceUID == study_instance_uid and ds.SeriesInstanceUID == series_instance_uid
        ]
        return found[offset : offset + (limit or len(found))]

    def retrieve_instance(self, study: str, series: str, sop: str, media_types: Any = None) -> pydicom.Dataset:  # noqa: ARG002
        self._tick()
        return self.instances[sop]

    def store_instances(self, datasets: list[pydicom.Dataset], study_instance_uid: str) -> None:  # noqa: ARG002
        self._tick()
        for ds in datasets:
            self.stored = [s for s in self.stored if s.SOPInstanceUID != ds.SOPInstanceUID] + [ds]


@pytest.fixture
def pacs(synthetic_fundus) -> FakePacs:
    study = pydicom.uid.generate_uid()
    good = pixels_to_dicom(synthetic_fundus(400, 300, 200, 150, 140), PhotoIdentity(PATIENT, "Secret^Name", "R", study))
    dark = pixels_to_dicom(
        synthetic_fundus(400, 300, 200, 150, 140, brightness=0.05), PhotoIdentity(PATIENT, "Secret^Name", "L", study)
    )
    multi = pixels_to_dicom(np.zeros((32, 32, 3), np.uint8), PhotoIdentity(PATIENT, "Secret^Name", "L", study))
    multi.NumberOfFrames = 2
    multi.PixelData = bytes(32 * 32 * 3 * 2)
    return FakePacs([good, dark, multi])


def _grader(pacs: FakePacs, pipeline, delays: list[float]) -> PacsGrader:
    return PacsGrader(pacs, pipeline.grade, ALGORITHM, retries=3, backoff_s=0.5, sleep=delays.append)  # type: ignore[arg-type]


def test_each_instance_gets_one_report_and_a_second_pass_does_nothing(pacs, grading_pipeline, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    delays: list[float] = []
    grader = _grader(pacs, grading_pipeline, delays)
    first = grader.run_once()
    assert first.found == 3 and first.already_done == 0
    assert first.graded + first.not_graded == 3
    assert first.statuses.get("error") == 1  # the two-frame instance, reported with its reason
    assert {str(sr.SOPInstanceUID) for sr in pacs.stored} == {sr_instance_uid(uid) for uid in pacs.instances}
    assert {str(sr.SeriesInstanceUID) for sr in pacs.stored} == {
        sr_series_uid(next(iter(pacs.instances.values())).StudyInstanceUID)
    }
    second = grader.run_once()
    assert (second.found, second.already_done, second.graded, second.not_graded) == (3, 3, 0, 0)
    assert len(pacs.stored) == 3
    assert PATIENT not in caplog.text and "Secret" not in caplog.text
    assert not delays


def test_a_pass_killed_half_way_is_finished_by_the_next(pacs, grading_pipeline) -> None:
    grader = _grader(pacs, grading_pipeline, [])
    first_ref = next(grader.photographs())
    grader.process(first_ref)  # as if the previous run died right after storing this report
    summary = grader.run_once()
    assert summary.already_done == 1 and summary.graded + summary.not_graded == 2
    assert len(pacs.stored) == 3


def test_outages_are_retried_with_doubling_delays(pacs, grading_pipeline, caplog) -> None:
    delays: list[float] = []
    grader = _grader(pacs, grading_pipeline, delays)
    pacs.outages = 2
    summary = grader.run_once()
    assert summary.found == 3 and len(pacs.stored) == 3
    assert delays == [0.5, 1.0]
    assert caplog.text.count("retry") == 2


def test_a_pacs_that_stays_down_is_reported_after_the_last_retry(pacs, grading_pipeline) -> None:
    delays: list[float] = []
    grader = _grader(pacs, grading_pipeline, delays)
    pacs.outages = 100
    with pytest.raises(PacsUnavailableError):
        grader.run_once()
    assert delays == [0.5, 1.0, 2.0]
    assert pacs.calls == 4
    # Watch mode waits an outage out instead of dying.
    pacs.outages = 4
    summaries = list(grader.watch(30.0, passes=2))
    assert len(summaries) == 1 and summaries[0].found == 3


def test_an_instance_without_valid_uids_to_reference_does_not_end_the_pass(pacs, grading_pipeline, caplog) -> None:
    """Its SR cannot reference it; it is counted as failed (tried again next pass) and the others get theirs."""
    odd = pixels_to_dicom(np.zeros((32, 32, 3), np.uint8), PhotoIdentity(PATIENT, "Secret^Name", "R"))
    odd.SeriesInstanceUID = "abc.def_ghi"
    pacs.instances[str(odd.SOPInstanceUID)] = odd
    caplog.set_level(logging.INFO)
    summary = _grader(pacs, grading_pipeline, []).run_once()
    assert (summary.found, summary.failed) == (4, 1)
    assert len(pacs.stored) == 3
    assert "Secret^Name" not in caplog.text and PATIENT not in caplog.text
