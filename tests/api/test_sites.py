"""Site profiles in the service: chosen per request, named in every answer, refused for another model; drift."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings
from retinagrade.errors import SiteProfileError
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation, build_reference


def _profile(tmp_path: Path, model_spec_path: Path, name: str, threshold: float, sha256: str | None = None) -> Path:
    spec = json.loads(model_spec_path.read_text())
    rng = np.random.default_rng(0)
    reference = build_reference(
        Observation("graded", float(q), float(p), int(p > 0.5) * 2)
        for q, p in zip(rng.uniform(0.6, 1.0, 200), rng.uniform(0, 1, 200), strict=True)
    )
    profile = SiteProfile(
        name=name,
        model_sha256=sha256 or spec["sha256"],
        created="2026-12-01",
        temperature=float(spec["calibration"]["temperature"]),
        referable_threshold=threshold,
        sample={"n_graded": 150},
        drift_reference=reference,
    )
    return profile.save(tmp_path / f"{name}.json")


@pytest.fixture
def two_sites(tmp_path: Path, model_spec_path: Path, make_settings: Callable[..., Settings]) -> Settings:
    # "refer-all" refers every graded eye (threshold 0), "refer-none" none (threshold 1 is never reached
    # by P(referable) < 1): the same photo must get opposite decisions.
    return make_settings(
        site_profiles=[
            _profile(tmp_path, model_spec_path, "refer-all", 0.0),
            _profile(tmp_path, model_spec_path, "refer-none", 1.0),
        ],
        default_site="refer-none",
        drift_min_images=2,
        drift_window=20,
    )


def test_a_request_picks_its_site_and_every_answer_names_it(two_sites: Settings, fundus_jpeg: bytes) -> None:
    with TestClient(create_app(two_sites)) as client:
        default = client.post("/v1/grade", files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}).json()
        by_header = client.post(
            "/v1/grade",
            files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")},
            headers={"X-Retinagrade-Site": "refer-all"},
        ).json()
        by_field = client.post(
            "/v1/grade", files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}, data={"site": "refer-all"}
        ).json()
        batch = client.post(
            "/v1/grade/batch",
            files=[("files", ("a.jpeg", fundus_jpeg, "image/jpeg"))],
            headers={"X-Retinagrade-Site": "refer-all"},
        ).json()
        card = client.get("/v1/model").json()
        records = client.app.state.service.audit.records()  # type: ignore[attr-defined]
    assert default["status"] == "graded"
    # A site's threshold moves only the risk referrals: a referable grade is referred at every site.
    assert default["site"] == "refer-none" and default["operating_point"] == "site"
    assert default["referable"] == (default["grade"] >= 2)
    assert default["referral_reason"] == ("grade" if default["grade"] >= 2 else "none")
    assert (by_header["site"], by_header["referable"]) == ("refer-all", True)
    assert (by_field["site"], by_field["referable"]) == ("refer-all", True)
    assert by_header["referral_reason"] in {"grade", "risk"} and by_header["referable_threshold"] == 0.0
    assert batch["items"][0]["result"]["site"] == "refer-all"
    # The probabilities are the same model's: only the operating point differs.
    assert default["probabilities"] == pytest.approx(by_header["probabilities"])
    assert card["default_site"] == "refer-none"
    assert {p["name"] for p in card["site_profiles"]} == {"refer-all", "refer-none"}
    assert all("drift_reference" not in p for p in card["site_profiles"])
    assert [json.loads(r["result"])["site"] for r in records] == ["refer-none", "refer-all", "refer-all", "refer-all"]


def test_an_unknown_site_is_a_clear_400(two_sites: Settings, fundus_jpeg: bytes) -> None:
    with TestClient(create_app(two_sites)) as client:
        response = client.post(
            "/v1/grade",
            files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")},
            headers={"X-Retinagrade-Site": "elsewhere"},
        )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "unknown_site" and "refer-all" in body["message"]


def test_without_profiles_answers_carry_no_site(client: TestClient, fundus_jpeg: bytes) -> None:
    answer = client.post("/v1/grade", files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}).json()
    assert answer["site"] is None
    assert client.get("/v1/model").json()["site_profiles"] == []
    response = client.post(
        "/v1/grade", files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}, headers={"X-Retinagrade-Site": "x"}
    )
    assert response.status_code == 400 and response.json()["code"] == "unknown_site"


def test_a_profile_for_another_model_stops_start_up(
    tmp_path: Path, model_spec_path: Path, make_settings: Callable[..., Settings]
) -> None:
    foreign = _profile(tmp_path, model_spec_path, "old-model", 0.3, sha256="0" * 64)
    with (
        pytest.raises(SiteProfileError, match="fitted for model"),
        TestClient(create_app(make_settings(site_profiles=[foreign]))),
    ):
        pass


@pytest.mark.parametrize("default", [None, "nowhere"])
def test_several_profiles_need_a_default_that_exists(
    tmp_path: Path, model_spec_path: Path, make_settings: Callable[..., Settings], default: str | None
) -> None:
    paths = [_profile(tmp_path, model_spec_path, n, 0.3) for n in ("a", "b")]
    app = create_app(make_settings(site_profiles=paths, default_site=default))
    with pytest.raises(SiteProfileError, match="default"), TestClient(app):
        pass


def test_site_profiles_are_read_from_the_environment(
    tmp_path: Path, model_spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = (_profile(tmp_path, model_spec_path, n, 0.3) for n in ("a", "b"))
    monkeypatch.setenv("RETINAGRADE_SITE_PROFILES", f"{a}, {b}")
    monkeypatch.setenv("RETINAGRADE_DEFAULT_SITE", "b")
    settings = Settings()
    assert settings.site_profiles == [a, b] and settings.default_site == "b"


def test_drift_gauges_appear_per_site_on_metrics(
    two_sites: Settings, fundus_jpeg: bytes, metrics_text: Callable[[TestClient], str]
) -> None:
    with TestClient(create_app(two_sites)) as client:
        for _ in range(3):
            client.post(
                "/v1/grade",
                files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")},
                headers={"X-Retinagrade-Site": "refer-all"},
            )
        text = metrics_text(client)
    lines = [line for line in text.splitlines() if line.startswith("retinagrade_drift_psi{")]
    values = {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    quality = values['signal="quality",site="refer-all"']
    assert math.isfinite(quality) and quality >= 0.0
    assert 'retinagrade_drift_window_images{site="refer-all"} 3.0' in text
    assert not any('site="refer-none"' in key for key in values)  # no answers there yet


def test_the_fhir_answer_names_the_site_profile_in_its_device(two_sites: Settings, fundus_jpeg: bytes) -> None:
    pytest.importorskip("fhir.resources", reason="the [dicom] extra (fhir.resources) is not installed")
    with TestClient(create_app(two_sites)) as client:
        single = client.post(
            "/v1/grade",
            files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")},
            headers={"X-Retinagrade-Site": "refer-all", "Accept": "application/fhir+json"},
        ).json()
        batch = client.post(
            "/v1/grade/batch",
            files=[("files", ("a.jpeg", fundus_jpeg, "image/jpeg"))],
            headers={"Accept": "application/fhir+json"},
        ).json()

    def device_site(bundle: dict[str, object]) -> list[str]:
        devices = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]  # type: ignore[attr-defined,index]
        return [v["text"] for d in devices for p in d.get("property", []) for v in p["valueCode"]]

    assert device_site(single) == ["refer-all"]
    assert device_site(batch) == ["refer-none"]


def test_explain_grades_with_the_site_asked_for(two_sites: Settings, fundus_jpeg: bytes) -> None:
    photo = {"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}
    with TestClient(create_app(two_sites)) as client:
        explained = {
            site: client.post("/v1/explain", files=photo, headers={"X-Retinagrade-Site": site})
            for site in ("refer-all", "refer-none")
        }
        graded = {
            site: client.post("/v1/grade", files=photo, headers={"X-Retinagrade-Site": site}).json()
            for site in ("refer-all", "refer-none")
        }
        by_field = client.post("/v1/explain", files=photo, data={"site": "refer-all"})
    for site, answer in explained.items():
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Retinagrade-Site"] == site
        # The decision in the headers is the site's, as /v1/grade gives it for that site.
        assert answer.headers["X-Retinagrade-Referable"] == str(graded[site]["referable"]).lower()
        assert answer.headers["X-Retinagrade-Grade"] == str(graded[site]["grade"])
    assert explained["refer-all"].headers["X-Retinagrade-Referable"] == "true"
    assert by_field.headers["X-Retinagrade-Site"] == "refer-all"


@pytest.mark.parametrize(
    ("header", "code"),
    [("X-Retinagrade-Site", "unknown_site"), ("X-Retinagrade-Operating-Point", "unknown_operating_point")],
)
def test_explain_refuses_a_site_or_point_it_does_not_have(
    two_sites: Settings, synthetic_jpeg: bytes, header: str, code: str
) -> None:
    with TestClient(create_app(two_sites)) as client:
        answer = client.post(
            "/v1/explain", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg", header: "nowhere"}
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == code
