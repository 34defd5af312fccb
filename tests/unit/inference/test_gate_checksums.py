"""The gate's files are checksummed in the model spec and a mismatch is refused like a wrong model file.

Before, an edited ``gate.json`` loaded silently and changed results while every answer reported the model's
sha256 (issue 8, item 9).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retinagrade.errors import ModelError
from retinagrade.inference.model_spec import ModelSpec, write_gate_checksums

MODELS = Path(__file__).resolve().parents[3] / "models"
SPEC = MODELS / "retinagrade-dr.json"

pytestmark = pytest.mark.skipif(not SPEC.is_file(), reason=f"needs the shipped model spec {SPEC}")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A copy of the shipped model folder (the ONNX model linked, the gate files copied)."""
    spec = json.loads(SPEC.read_text())
    (tmp_path / SPEC.name).write_text(json.dumps(spec))
    (tmp_path / spec["model_file"]).symlink_to(MODELS / spec["model_file"])
    gate = json.loads((MODELS / spec["gate_file"]).read_text())
    shutil.copyfile(MODELS / spec["gate_file"], tmp_path / spec["gate_file"])
    if "detector" in gate:
        shutil.copyfile(MODELS / gate["detector"]["file"], tmp_path / gate["detector"]["file"])
    return tmp_path


def test_shipped_spec_lists_every_gate_file() -> None:
    spec = ModelSpec.load(SPEC)
    gate = json.loads((MODELS / str(spec.gate_file)).read_text())
    expected = {str(spec.gate_file)} | ({gate["detector"]["file"]} if "detector" in gate else set())
    assert set(spec.gate_files) == expected


def test_edited_gate_file_is_refused(model_dir: Path) -> None:
    write_gate_checksums(model_dir / SPEC.name)
    spec = ModelSpec.load(model_dir / SPEC.name)
    gate_path = model_dir / str(spec.gate_file)
    gate = json.loads(gate_path.read_text())
    gate["threshold"] = 0.99
    gate_path.write_text(json.dumps(gate))
    with pytest.raises(ModelError, match="does not match the sha256"):
        ModelSpec.load(model_dir / SPEC.name)


def test_replaced_detector_file_is_refused(model_dir: Path) -> None:
    write_gate_checksums(model_dir / SPEC.name)
    spec = ModelSpec.load(model_dir / SPEC.name)
    detector = [name for name in spec.gate_files if name != spec.gate_file]
    if not detector:
        pytest.skip("this gate has no detector file")
    (model_dir / detector[0]).write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match=f"gate file {detector[0]} does not match"):
        ModelSpec.load(model_dir / SPEC.name)


def test_missing_gate_file_is_refused(model_dir: Path) -> None:
    write_gate_checksums(model_dir / SPEC.name)
    spec = ModelSpec.load(model_dir / SPEC.name)
    (model_dir / str(spec.gate_file)).unlink()
    with pytest.raises(ModelError, match="does not exist"):
        ModelSpec.load(model_dir / SPEC.name)


def test_spec_whose_gate_file_is_unlisted_is_refused(model_dir: Path) -> None:
    write_gate_checksums(model_dir / SPEC.name)
    data = json.loads((model_dir / SPEC.name).read_text())
    data["gate_file"] = "other-gate.json"
    (model_dir / SPEC.name).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="not listed"):
        ModelSpec.load(model_dir / SPEC.name)
