"""Accept-header negotiation for /v1/grade: JSON by default, FHIR or a DICOM SR when the client prefers them."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from retinagrade.api.interop import NotAcceptableError, negotiate


def _request(accept: str | None) -> Request:
    headers = [] if accept is None else [(b"accept", accept.encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/grade", "headers": headers})


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "json"),
        ("", "json"),
        ("*/*", "json"),
        ("application/json", "json"),
        ("application/fhir+json", "fhir"),
        ("application/dicom", "dicom"),
        ("application/fhir+json;q=0.5, application/json", "json"),
        ("application/json;q=0.2, application/fhir+json;q=0.9", "fhir"),
        ("application/dicom, */*;q=0.1", "dicom"),
        ("text/html, application/xml;q=0.9, */*;q=0.8", "json"),  # a browser
        ("APPLICATION/FHIR+JSON; charset=utf-8", "fhir"),
    ],
)
def test_preference(accept: str | None, expected: str) -> None:
    assert negotiate(_request(accept)) == expected


def test_types_nobody_offers_get_the_json_clients_always_got() -> None:
    assert negotiate(_request("text/html")) == "json"
    assert negotiate(_request("application/json;q=0")) == "json"


def test_an_sr_where_none_is_offered_is_406() -> None:
    with pytest.raises(NotAcceptableError) as caught:
        negotiate(_request("application/dicom"), dicom_offered=False)
    assert caught.value.http_status == 406
