"""ONNX export matches PyTorch through the same preprocessing (needs the [train] extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from retinagrade.preprocessing.pipeline import PreprocessConfig  # noqa: E402
from retinagrade.training.export import parity  # noqa: E402
from retinagrade.training.model import build_grader, export_onnx  # noqa: E402


def test_onnx_matches_pytorch_on_real_photos(tmp_path: Path, shared_data: Path) -> None:
    torch.manual_seed(0)
    net = build_grader("tf_efficientnet_lite0", frozen_stages=6, pretrained=True).eval()
    # a non-trivial head, so a dropped or mis-ordered output would show
    with torch.no_grad():
        net.tail.classifier.weight.normal_(0, 0.05)
        net.tail.regressor.weight.normal_(0, 0.05)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(net, onnx_path, 224)
    images = [
        (shared_data / "raw-fundus-samples/images/16_right.jpeg").read_bytes(),
        (shared_data / "eyepacs-768/images/1000_left.jpg").read_bytes(),
        (shared_data / "non-fundus/images/retina.jpg").read_bytes(),
    ]
    diffs = parity(net, onnx_path, images, PreprocessConfig())
    assert max(diffs.values()) < 1e-3, diffs


def test_shipped_model_records_its_parity(model_path: Path) -> None:
    import json

    spec = json.loads(model_path.read_text())
    recorded = spec["export"]["parity_max_abs_diff"]
    # every output is checked, the oedema head's too when the model has one
    assert set(recorded) == {"logits", "regression", "cam", "embedding", *(["dme"] if "dme" in spec["outputs"] else [])}
    assert max(recorded.values()) < 1e-3
    assert np.isfinite(list(recorded.values())).all()
