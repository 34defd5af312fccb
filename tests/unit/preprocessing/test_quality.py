"""The quality / not-a-fundus gate on synthetic images, with the shipped parameters (models/gate.json)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retinagrade.preprocessing.decode import DecodedImage, decode_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, prepare
from retinagrade.preprocessing.quality import (
    FEATURE_NAMES,
    REASON_BLURRED,
    REASON_NOT_FUNDUS,
    REASON_TOO_DARK,
    GateParams,
    QualityAssessment,
    assess_quality,
    compute_quality_features,
)

GATE_FILE = Path(__file__).resolve().parents[3] / "models" / "gate.json"


@pytest.fixture(scope="module")
def gate() -> GateParams:
    return GateParams.from_json(GATE_FILE)


def _as_decoded(rgb: np.ndarray) -> DecodedImage:
    """Through PNG bytes and decode_image, as a client's upload would go."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), min_side=448)


def _assess(rgb: np.ndarray, gate: GateParams) -> QualityAssessment:
    decoded = _as_decoded(rgb)
    return assess_quality(decoded, prepare(decoded, PreprocessConfig()), gate)


@pytest.fixture
def fundus_rgb(synthetic_fundus: Callable[..., np.ndarray]) -> np.ndarray:
    return synthetic_fundus(640, 512, 320, 256, 240, seed=1)


def test_synthetic_fundus_is_gradable(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    verdict = _assess(fundus_rgb, gate)
    assert verdict.is_fundus
    assert verdict.gradable, verdict.reasons
    assert verdict.reasons == ()
    assert 0.5 < verdict.score <= 1.0


def test_heavily_blurred_fundus_is_ungradable_blurred(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    blurred = cv2.GaussianBlur(fundus_rgb, (0, 0), 8.0)
    verdict = _assess(blurred, gate)
    assert verdict.is_fundus
    assert not verdict.gradable
    assert REASON_BLURRED in verdict.reasons
    assert verdict.score < _assess(fundus_rgb, gate).score


def test_darkened_fundus_is_ungradable_too_dark(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    dark = np.clip(fundus_rgb.astype(np.float32) * 0.1 + 0.5, 0, 255).astype(np.uint8)
    verdict = _assess(dark, gate)
    assert verdict.is_fundus
    assert not verdict.gradable
    assert REASON_TOO_DARK in verdict.reasons


def _white_page_with_text_bars() -> np.ndarray:
    page = np.full((600, 450, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    for row in range(40, 560, 24):
        x = 40
        while x < 400:
            word = int(rng.integers(15, 60))
            page[row : row + 10, x : min(x + word, 410)] = 20
            x += word + 12
    return page


@pytest.mark.parametrize(
    "name",
    ["uniform_gray", "random_noise", "text_page", "grayscale_fundus", "fundus_on_white"],
)
def test_non_fundus_images_are_refused(
    name: str, gate: GateParams, synthetic_fundus: Callable[..., np.ndarray]
) -> None:
    rng = np.random.default_rng(0)
    images = {
        "uniform_gray": lambda: np.full((400, 400, 3), 128, np.uint8),
        "random_noise": lambda: rng.integers(0, 256, (400, 400, 3), dtype=np.uint8),
        "text_page": _white_page_with_text_bars,
        "grayscale_fundus": lambda: np.repeat(
            cv2.cvtColor(synthetic_fundus(512, 512, 256, 256, 240), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2
        ),
        # A disc on a light background: no camera surround.
        "fundus_on_white": lambda: synthetic_fundus(512, 512, 256, 256, 200, background=235),
    }
    verdict = _assess(images[name](), gate)
    assert not verdict.is_fundus
    assert not verdict.gradable
    assert verdict.reasons[0] == REASON_NOT_FUNDUS
    assert len(verdict.reasons) >= 2, "a specific reason must follow not_fundus"
    assert 0.0 <= verdict.score <= 1.0


def test_tiny_image_is_refused(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    tiny = cv2.resize(fundus_rgb, (100, 80), interpolation=cv2.INTER_AREA)
    verdict = _assess(tiny, gate)
    assert not verdict.is_fundus
    assert "image_too_small" in verdict.reasons


def test_features_do_not_depend_on_resolution(synthetic_fundus: Callable[..., np.ndarray]) -> None:
    config = PreprocessConfig()
    small = _as_decoded(synthetic_fundus(560, 448, 280, 224, 210, seed=3))
    large = _as_decoded(synthetic_fundus(1680, 1344, 840, 672, 630, seed=3))
    f_small = compute_quality_features(small, prepare(small, config))
    f_large = compute_quality_features(large, prepare(large, config))
    assert set(f_small) == set(FEATURE_NAMES)
    for name in (
        "sharpness",
        "laplacian_rel",
        "detail_contrast",
        "lum_cv",
        "lum_p50",
        "corner_dark_fraction",
    ):
        assert f_large[name] == pytest.approx(f_small[name], rel=0.15, abs=0.02), name


def test_gate_params_round_trip(gate: GateParams, tmp_path: Path) -> None:
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(gate.to_dict()))
    assert GateParams.from_json(path) == gate


def test_malformed_gate_params_are_rejected(gate: GateParams) -> None:
    data = gate.to_dict()
    with pytest.raises(ValueError):
        GateParams.from_dict({**data, "coef": data["coef"][:-1]})
    with pytest.raises(ValueError):
        GateParams.from_dict({**data, "features": ["no_such_feature", *data["features"][1:]]})
    with pytest.raises(ValueError):
        GateParams.from_dict({**data, "threshold": 1.5})
    with pytest.raises(KeyError):
        GateParams.from_dict({k: v for k, v in data.items() if k != "intercept"})


def test_extreme_feature_values_keep_score_in_range(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    decoded = _as_decoded(fundus_rgb)
    features = compute_quality_features(decoded, prepare(decoded, PreprocessConfig()))
    for value in (-1e9, 1e9, float("nan")):
        wild = dict.fromkeys(features, value)
        assert 0.0 <= 1.0 - gate.probability_ungradable(wild) <= 1.0
