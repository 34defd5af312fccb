"""The rest of issue 20 B's re-probe: metrics cardinality, patient data in logs, the site on /v1/explain, API keys
that are only separators, CORS for the site header."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retinagrade.api.telemetry import HTTP_METHODS


def test_unknown_http_methods_share_one_metric_label(client: TestClient, metrics_text: Callable[..., str]) -> None:
    for index in range(40):
        client.request(f"BOGUS{index}", "/health/live")
    client.request("PROPFIND", "/v1/grade")
    methods = set(re.findall(r'retinagrade_http_requests_total\{[^}]*method="([^"]*)"', metrics_text(client)))
    assert methods <= {*HTTP_METHODS, "other"}, methods
    assert "other" in methods


class _Collect(logging.Handler):
    """Every record it sees, formatted with its traceback as a plain handler would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def reaching_root() -> Iterator[_Collect]:
    """What reaches the root logger, at any level: where a deployment that configures logging would print it."""
    root = logging.getLogger()
    collect, level = _Collect(), root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        yield collect
    finally:
        root.removeHandler(collect)
        root.setLevel(level)


def test_no_patient_identifier_reaches_a_log_line(
    live_server: Callable[..., Any],
    synthetic_fundus: Callable[..., np.ndarray],
    capfd: pytest.CaptureFixture[str],
    reaching_root: _Collect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("highdicom", reason="needs the [dicom] extra (highdicom)")
    from retinagrade.interop.photo import PhotoIdentity, to_bytes, wrap_jpeg
    from retinagrade.pipeline import GradingPipeline

    buffer = io.BytesIO()
    Image.fromarray(synthetic_fundus(320, 240, 160, 120, 110)).save(buffer, "JPEG", quality=90)
    ds = wrap_jpeg(buffer.getvalue(), PhotoIdentity("PAT-0001", "John Doe", "R", accession_number="ACC-77"))
    ds.PatientBirthDate, ds.PatientSex = "19600317", "M"
    ds["PatientBirthDate"].value, ds["PatientSex"].value, ds["StudyTime"].value = "1960-03-17", "male", "25:99"
    secrets = ("John Doe", "1960-03-17", "PAT-0001", "ACC-77", ds.SOPInstanceUID, ds.StudyInstanceUID)
    data = to_bytes(ds)  # pydicom warns, here in the test, about the values it writes
    capfd.readouterr()
    server = live_server(log_level="DEBUG")
    headers = {"Content-Type": "application/dicom"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for accept in ("application/json", "application/fhir+json", "application/dicom"):
            answer = http.post("/v1/grade", content=data, headers={**headers, "Accept": accept})
            assert answer.status_code == 200, answer.text
        prepare = GradingPipeline.prepare

        def quoting(self: GradingPipeline, data: bytes) -> object:
            # As a third-party reader's message does: it quotes what it read.
            raise ValueError(f"cannot convert {ds.PatientBirthDate!r} for {ds.PatientName} ({ds.SOPInstanceUID})")

        monkeypatch.setattr(GradingPipeline, "prepare", quoting)
        failed = http.post("/v1/grade", content=data, headers=headers)
        monkeypatch.setattr(GradingPipeline, "prepare", prepare)
    assert failed.status_code == 500 and failed.json()["code"] == "internal_error"
    captured = capfd.readouterr()
    logged = captured.err + captured.out + "\n".join(reaching_root.lines)
    assert "ValueError" in logged, "the failure is logged (its type and where)"
    for secret in secrets:
        assert secret not in logged, secret


def test_the_log_keeps_retinagrade_and_audit_store_messages_and_withholds_others() -> None:
    import sqlite3

    from retinagrade.api.logging import WITHHELD, JsonFormatter
    from retinagrade.errors import ModelError

    def logged(exc: BaseException) -> str:
        try:
            raise exc
        except BaseException as caught:
            record = logging.LogRecord(
                "retinagrade.api",
                logging.ERROR,
                __file__,
                1,
                "failed",
                (),
                (type(caught), caught, caught.__traceback__),
            )
        return JsonFormatter().format(record)

    assert "Doe^John" not in logged(ValueError("PatientName Doe^John")) and WITHHELD in logged(KeyError("x"))
    assert "the spec's checksum differs" in logged(ModelError("the spec's checksum differs"))
    assert "database or disk is full" in logged(sqlite3.OperationalError("database or disk is full"))
    quoted = b"Doe^John" + b"\xff"
    try:
        try:
            raise UnicodeDecodeError("utf-8", quoted, 8, 9, "invalid start byte")
        except UnicodeDecodeError as inner:
            raise ModelError("wrapped") from inner
    except ModelError as outer:
        chained = logged(outer)
    assert "wrapped" in chained and "Doe" not in chained and "UnicodeDecodeError" in chained


@pytest.mark.parametrize("value", [" , ", ",", "   ", ",,\t,"])
def test_api_keys_of_only_separators_refuse_to_start(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from retinagrade.api.server import CONFIG_ERROR, preflight

    monkeypatch.setenv("RETINAGRADE_API_KEYS", value)
    with pytest.raises(SystemExit) as stopped:
        preflight("127.0.0.1")
    assert stopped.value.code == CONFIG_ERROR
    assert "api_keys" in capsys.readouterr().err


def test_empty_api_keys_still_mean_no_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    from retinagrade.api.settings import Settings

    monkeypatch.setenv("RETINAGRADE_API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.setenv("RETINAGRADE_API_KEYS", " key-one , key-two ,")
    assert Settings().api_keys == ["key-one", "key-two"]


def test_cors_preflight_allows_the_site_header(make_settings: Callable[..., Any]) -> None:
    from retinagrade.api.app import create_app

    origin = "https://screening.example"
    client = TestClient(create_app(make_settings(cors_origins=[origin])))
    answer = client.options(
        "/v1/grade",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-retinagrade-site, x-api-key, content-type",
        },
    )
    assert answer.status_code == 200, answer.text
    assert "x-retinagrade-site" in answer.headers["access-control-allow-headers"].lower()
