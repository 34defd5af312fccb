"""Grade the photographs in a PACS and store the results back beside them, over DICOMweb.

One pass: find Ophthalmic Photography series (QIDO-RS), list their instances, skip every instance that
already has its retinagrade SR, fetch the others as stored (WADO-RS, ``transfer-syntax=*``, so a camera's JPEG
arrives byte for byte and is graded exactly as the JPEG file would be), grade them, and store one SR each
(STOW-RS). An instance that cannot be graded (ungradable, not a fundus, unreadable) gets an SR saying why.

Idempotent and restart-safe without local state: each SR's SOP Instance UID is derived from its source's
(:func:`~retinagrade.interop.dicom_sr.sr_instance_uid`) and all of a study's SRs sit in one series whose UID
is derived from the study's, so "has this photo been graded?" is one QIDO query per study, answered by the
PACS itself. A pass killed half-way leaves stored SRs that the next pass skips, and an SR stored twice is
the same object. Network failures and 5xx answers are retried with exponential backoff; an instance still
failing is left for the next pass. Logs name instances by a short hash of their UID, never a patient id.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from retinagrade.errors import CorruptImageError, InputError
from retinagrade.interop.dicom_sr import SourceNotReferenceableError, build_sr, placeholder_source, sr_series_uid
from retinagrade.interop.findings import AlgorithmInfo, EyeFinding, finding_from
from retinagrade.preprocessing.dicom import (
    OPHTHALMIC_PHOTOGRAPHY_8BIT,
    PHOTOGRAPH_SOP_CLASSES,
    dicom_metadata,
    read_dataset,
)

logger = logging.getLogger("retinagrade.dicomweb")

T = TypeVar("T")
#: Fetch instances in the transfer syntax they were stored in (the DICOMweb default would transcode).
AS_STORED: Final = (("application/dicom", "*"),)
_UID_TAGS: Final = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018"}
_SOP_CLASS_TAG: Final = "00080016"
PAGE_SIZE: Final = 200

Grader = Callable[[bytes], Any]
"""Grades one DICOM file: returns a GradeResult, raises InputError for bad input (GradingPipeline.grade)."""


class PacsUnavailableError(Exception):
    """The PACS did not answer (or answered 5xx) after every retry: a failure of the command, not of an input."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str
    sop_class: str = ""

    @property
    def tag(self) -> str:
        """A short, stable, non-identifying name for logs."""
        return hashlib.sha256(self.sop.encode()).hexdigest()[:12]


@dataclass
class PassSummary:
    """What one pass did; counts only, safe to log."""

    found: int = 0
    already_done: int = 0
    graded: int = 0
    not_graded: int = 0
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "already_done": self.already_done,
            "graded": self.graded,
            "not_graded": self.not_graded,
            "failed": self.failed,
            "statuses": dict(self.statuses),
        }


def make_session(auth: str | None = None, token: str | None = None) -> requests.Session:
    """A requests session with HTTP basic (``user:password``) or bearer-token authentication."""
    session = requests.Session()
    if auth:
        user, _, password = auth.partition(":")
        session.auth = (user, password)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status >= 500 or status in (408, 429)
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


class PacsGrader:
    """Runs passes over one DICOMweb server.

    Args:
        client: the DICOMweb client (base URL, session, timeouts).
        grade: grades one DICOM file's bytes (``GradingPipeline.grade``).
        algorithm: the model, as named in each SR.
        retries: attempts per request after the first, on network errors and 5xx answers.
        backoff_s: first retry delay; doubled on each further retry.
        sleep: how to wait (replaced in tests).
    """

    def __init__(
        self,
        client: DICOMwebClient,
        grade: Grader,
        algorithm: AlgorithmInfo,
        *,
        retries: int = 4,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        # Retries are done here, logged and bounded by ``retries``; the client's own would double them.
        client.set_http_retry_params(retry=False)
        self.grade = grade
        self.algorithm = algorithm
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (requests.RequestException, OSError) as exc:
                if not _retryable(exc) or attempt == self.retries:
                    if _retryable(exc):
                        raise PacsUnavailableError(f"{what}: the PACS did not answer") from exc
                    raise
                delay = self.backoff_s * (2**attempt)
                logger.warning("%s failed (%s); retry %d in %.1f s", what, type(exc).__name__, attempt + 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- finding work ---------------------------------------------------------------------------------------
    def _pages(self, what: str, search: Callable[[int], list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._call(what, functools.partial(search, offset))
            yield from page
            if len(page) < PAGE_SIZE:
                return
            offset += len(page)

    def photographs(self) -> Iterator[InstanceRef]:
        """Every Ophthalmic Photography instance on the server."""
        series_list = self._pages(
            "QIDO series",
            lambda offset: self.client.search_for_series(
                search_filters={"Modality": "OP"}, limit=PAGE_SIZE, offset=offset
            ),
        )
        for series in series_list:
            study_uid, series_uid = (
                _value(series, _UID_TAGS["StudyInstanceUID"]),
                _value(series, _UID_TAGS["SeriesInstanceUID"]),
            )
            instances = self._pages(
                "QIDO instances",
                functools.partial(self._series_instances, study_uid, series_uid),
            )
            for item in instances:
                sop_class = _value(item, _SOP_CLASS_TAG)
                if sop_class and sop_class not in PHOTOGRAPH_SOP_CLASSES:
                    continue
                yield InstanceRef(study_uid, series_uid, _value(item, _UID_TAGS["SOPInstanceUID"]), sop_class)

    def _series_instances(self, study_uid: str, series_uid: str, offset: int) -> list[dict[str, Any]]:
        return self.client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=series_uid, limit=PAGE_SIZE, offset=offset
        )

    def existing_reports(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs of the SRs retinagrade already stored in a study."""
        try:
            found = self._call(
                "QIDO reports",
                lambda: self.client.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=sr_series_uid(study_uid)
                ),
            )
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return set()
            raise
        return {_value(item, _UID_TAGS["SOPInstanceUID"]) for item in found}

    # -- doing it -------------------------------------------------------------------------------------------
    def _fetch(self, ref: InstanceRef) -> bytes:
        ds = self._call(
            "WADO instance",
            lambda: self.client.retrieve_instance(ref.study, ref.series, ref.sop, media_types=AS_STORED),
        )
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def _source_header(self, data: bytes, ref: InstanceRef) -> Dataset:
        try:
            if data:
                return read_dataset(data, stop_before_pixels=True)
        except InputError:
            pass
        # Unreadable: the SR still needs the photo's identity to sit beside it.
        return placeholder_source(ref.study, ref.series, ref.sop, ref.sop_class or OPHTHALMIC_PHOTOGRAPHY_8BIT)

    def process(self, ref: InstanceRef, instance_number: int = 1) -> EyeFinding:
        """Fetch, grade and store the SR for one instance; returns the finding that was stored."""
        outcome: Any
        try:
            data = self._fetch(ref)
        except InvalidDicomError:
            # The server holds something that is not a DICOM file under this UID: report it as unreadable.
            data = b""
            outcome = CorruptImageError("The PACS returned an instance that is not a readable DICOM file.")
        header = self._source_header(data, ref)
        if data:
            try:
                outcome = self.grade(data)
            except InputError as exc:
                outcome = exc
        finding = finding_from(outcome, dicom_metadata(header))
        sr = build_sr(header, finding, self.algorithm, instance_number=instance_number)
        self._call("STOW report", lambda: self.client.store_instances([sr], study_instance_uid=ref.study))
        return finding

    def run_once(self) -> PassSummary:
        """One pass over the server. Never raises for one bad instance; raises only if the PACS is gone."""
        summary = PassSummary()
        done_by_study: dict[str, set[str]] = {}
        from retinagrade.interop.dicom_sr import sr_instance_uid

        for ref in self.photographs():
            summary.found += 1
            if ref.study not in done_by_study:
                done_by_study[ref.study] = self.existing_reports(ref.study)
            if sr_instance_uid(ref.sop) in done_by_study[ref.study]:
                summary.already_done += 1
                continue
            try:
                finding = self.process(ref, instance_number=len(done_by_study[ref.study]) + 1)
            except PacsUnavailableError:
                raise
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                logger.warning("instance %s: the PACS answered %d; left for the next pass", ref.tag, status)
                summary.failed += 1
                continue
            except SourceNotReferenceableError as exc:
                logger.warning("instance %s: %s, so no report can reference it", ref.tag, exc)
                summary.failed += 1
                continue
            done_by_study[ref.study].add(sr_instance_uid(ref.sop))
            summary.statuses[finding.status] = summary.statuses.get(finding.status, 0) + 1
            if finding.status == "graded":
                summary.graded += 1
            else:
                summary.not_graded += 1
            logger.info("instance %s: %s, report stored", ref.tag, finding.status)
        return summary

    def watch(self, every_s: float, passes: int | None = None) -> Iterator[PassSummary]:
        """Run a pass every ``every_s`` seconds (forever, or ``passes`` times); a PACS outage waits it out."""
        count = 0
        while passes is None or count < passes:
            try:
                yield self.run_once()
            except PacsUnavailableError as exc:
                logger.error("pass abandoned: %s", exc.message)
            count += 1
            if passes is None or count < passes:
                self.sleep(every_s)
