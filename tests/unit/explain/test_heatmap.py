"""The heatmap reads the severity map the spec names, and the grader reads the outputs the spec declares."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from retinagrade.errors import ModelError
from retinagrade.explain.heatmap import evidence_map
from retinagrade.inference.grader import OnnxGrader
from retinagrade.inference.model_spec import ModelSpec


def test_the_evidence_map_comes_from_the_channel_it_is_given() -> None:
    cam = np.zeros((6, 10, 10), np.float32)
    cam[2, 1, 1] = 5.0  # evidence only in channel 2, top left
    cam[5, 8, 8] = 5.0  # and only in channel 5, bottom right
    top_left = evidence_map(cam, 20, channel=2)
    bottom_right = evidence_map(cam, 20, channel=5)
    assert top_left[:10, :10].sum() > top_left[10:, 10:].sum()
    assert bottom_right[10:, 10:].sum() > bottom_right[:10, :10].sum()


def test_the_shipped_spec_names_the_regression_map_as_severity(model_path: Path) -> None:
    spec = ModelSpec.load(model_path)
    assert spec.cam_channels[spec.severity_channel] == "regression"


def test_a_spec_that_declares_no_cam_output_is_refused(model_path: Path) -> None:
    spec = ModelSpec.load(model_path)
    broken = dataclasses.replace(spec, outputs=("logits", "regression", "embedding"))
    with pytest.raises(ModelError, match="cam"):
        OnnxGrader(broken)
