"""A photo graded despite its quality says so in the service's answer (``quality.warning``) and on the page."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings


@pytest.fixture
def lenient_model(model_spec_path: Path, tmp_path: Path) -> Path:
    """A copy of the model whose gate refuses every photo by its score and lets any referable answer outrank it.

    Without the detector: the synthetic test photo is not a photograph, and the detector would call it so.
    """
    folder = tmp_path / "model"
    shutil.copytree(model_spec_path.parent, folder, ignore=shutil.ignore_patterns("README.md"))
    spec = json.loads((folder / model_spec_path.name).read_text())
    spec.pop("gate_files", None)  # the edited gate is not the one the spec's checksums name
    (folder / model_spec_path.name).write_text(json.dumps(spec))
    gate_path = folder / spec.get("gate_file", "gate.json")
    gate = json.loads(gate_path.read_text())
    gate.pop("detector", None)
    gate.update(threshold=1e-4, referable_override={"min_p_referable": 1e-9})
    gate_path.write_text(json.dumps(gate))
    return folder / model_spec_path.name


def test_an_answer_graded_despite_poor_quality_carries_the_warning_and_the_reasons(
    lenient_model: Path, make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    with TestClient(create_app(make_settings(model=lenient_model))) as client:
        response = client.post("/v1/grade", files={"file": ("eye.jpeg", synthetic_jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "graded" and body["grade"] is not None
    assert body["quality"]["warning"] is True and body["quality"]["gradable"] is True
    assert body["quality"]["reasons"], "the warning says what is wrong with the photo"


def test_a_plain_graded_answer_has_no_warning(client: TestClient, fundus_jpeg: bytes) -> None:
    body = client.post("/v1/grade", files={"file": ("eye.jpeg", fundus_jpeg, "image/jpeg")}).json()
    assert body["status"] == "graded"
    assert body["quality"]["warning"] is False and body["quality"]["reasons"] == []
