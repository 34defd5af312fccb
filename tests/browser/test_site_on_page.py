"""The screening page names the site profile it grades under, and that site's operating point."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from retinagrade.api.settings import Settings
from retinagrade.inference.site_profile import SiteProfile

pytestmark = pytest.mark.browser


def test_page_names_the_site_and_its_operating_point(
    make_settings: Callable[..., Settings],
    start_service: Callable[[Settings], AbstractContextManager[str]],
    open_page: Callable[..., Any],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    spec = json.loads(Path(settings.model).read_text())  # type: ignore[arg-type]
    profile = SiteProfile("clinic-a", spec["sha256"], "2026-12-01", 1.2, 0.27, sample={"n_graded": 150})
    with start_service(make_settings(site_profiles=[profile.save(tmp_path / "site.json")])) as url:
        page = open_page(url=url)
        page.wait_for_selector("#model-line:has-text('site profile clinic-a')")
        operating_point = page.locator("#operating-point").inner_text()
        report_model = page.locator("#report-model").inner_text()
    assert "this site's operating point (profile clinic-a, fitted on 150 local photos)" in operating_point
    assert "risk at least 27%" in operating_point
    assert "site profile clinic-a" in report_model
