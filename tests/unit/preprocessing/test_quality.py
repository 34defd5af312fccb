"""The quality / not-a-fundus gate on synthetic images, with the shipped parameters (models/gate.json).

Synthetic discs are not photographs: the learned detector refuses them (they are one of its negative kinds), so
the gradability tests below judge them with the detector's verdict given as "a fundus photo" and check the
detector separately.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retinagrade.errors import ModelError
from retinagrade.preprocessing.decode import DecodedImage, decode_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, prepare_fundus
from retinagrade.preprocessing.quality import (
    FEATURE_NAMES,
    REASON_BLURRED,
    REASON_NOT_FUNDUS,
    REASON_TOO_DARK,
    REASON_UNLIKE_FUNDUS,
    GateParams,
    QualityAssessment,
    ReferableOverride,
    ResolutionCalibration,
    assess_quality,
    compute_quality_features,
    decide,
    open_detector,
    outrank_with_referable,
)
from retinagrade.preprocessing.quality_detector import FundusDetector, detector_thumbnail
from retinagrade.preprocessing.quality_features import SURROUND_SIDE, overview

GATE_FILE = Path(__file__).resolve().parents[3] / "models" / "gate.json"


@pytest.fixture(scope="module")
def gate() -> GateParams:
    return GateParams.from_json(GATE_FILE)


@pytest.fixture(scope="module")
def detector(gate: GateParams) -> FundusDetector:
    opened = open_detector(gate)
    assert opened is not None, "the shipped gate has a learned detector"
    return opened


def _as_decoded(rgb: np.ndarray) -> DecodedImage:
    """Through PNG bytes and decode_image, as a client's upload would go."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), min_side=448)


def _assess(rgb: np.ndarray, gate: GateParams, fundus_score: float | None = 1.0) -> QualityAssessment:
    """The gate's verdict; ``fundus_score`` stands in for the detector (None: run the shipped detector)."""
    decoded = _as_decoded(rgb)
    prepared = prepare_fundus(decoded, PreprocessConfig())
    if fundus_score is None:
        opened = open_detector(gate)
        return assess_quality(decoded, prepared, gate, opened)
    return decide(compute_quality_features(decoded, prepared), gate, fundus_score)


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
    verdict = _assess(images[name](), gate, fundus_score=None)
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
    f_small = compute_quality_features(small, prepare_fundus(small, config))
    f_large = compute_quality_features(large, prepare_fundus(large, config))
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
    features = compute_quality_features(decoded, prepare_fundus(decoded, PreprocessConfig()))
    for value in (-1e9, 1e9, float("nan")):
        wild = dict.fromkeys(features, value)
        assert 0.0 <= 1.0 - gate.probability_ungradable(wild) <= 1.0


def test_detector_refuses_what_it_scores_unlike_a_fundus(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    assert gate.detector is not None
    below = gate.detector.threshold * 0.5
    verdict = _assess(fundus_rgb, gate, fundus_score=below)
    assert not verdict.is_fundus and not verdict.gradable
    assert verdict.reasons == (REASON_NOT_FUNDUS, REASON_UNLIKE_FUNDUS)
    assert verdict.fundus_score == below
    assert _assess(fundus_rgb, gate, fundus_score=1.0).is_fundus


def test_a_gate_with_a_detector_never_decides_without_its_score(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    decoded = _as_decoded(fundus_rgb)
    prepared = prepare_fundus(decoded, PreprocessConfig())
    with pytest.raises(ValueError, match="detector"):
        decide(compute_quality_features(decoded, prepared), gate)
    with pytest.raises(ValueError, match="detector"):
        assess_quality(decoded, prepared, gate)


def test_shipped_detector_scores_in_range_and_refuses_a_face_like_pattern(
    detector: FundusDetector, fundus_rgb: np.ndarray
) -> None:
    rng = np.random.default_rng(0)
    page = _white_page_with_text_bars()
    noise = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    for image in (page, noise, fundus_rgb):
        p = detector.probability(image)
        assert 0.0 <= p <= 1.0
    assert detector.probability(page) < detector.params.threshold


def test_detector_thumbnail_letterboxes_on_black() -> None:
    wide = np.full((100, 400, 3), 200, np.uint8)
    thumb = detector_thumbnail(wide, 128)
    assert thumb.shape == (128, 128, 3) and thumb.dtype == np.uint8
    assert thumb[:40].max() == 0 and thumb[-40:].max() == 0  # padding above and below the 128 x 32 image
    assert thumb[64, 10:118].min() == 200


@pytest.mark.parametrize("shape", [(712, 1072, 3), (1072, 712, 3), (90, 120, 3), (64, 2000, 3)])
def test_detector_takes_the_surround_thumbnail_only_where_it_is_the_same(shape: tuple[int, int, int]) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    shared = overview(rgb, SURROUND_SIDE)
    assert np.array_equal(detector_thumbnail(rgb, SURROUND_SIDE, shared), detector_thumbnail(rgb, SURROUND_SIDE))
    # A detector of another side makes its own.
    assert np.array_equal(detector_thumbnail(rgb, 96, shared), detector_thumbnail(rgb, 96))


def test_detector_file_that_does_not_match_its_checksum_is_refused(gate: GateParams, tmp_path: Path) -> None:
    assert gate.detector is not None and gate.detector_path is not None
    tampered = tmp_path / gate.detector.file
    tampered.write_bytes(gate.detector_path.read_bytes() + b"\0")
    moved = GateParams.from_dict(gate.to_dict(), base_dir=tmp_path)
    with pytest.raises(ModelError, match="does not match the sha256"):
        open_detector(moved)
    tampered.unlink()
    with pytest.raises(ModelError, match="does not exist"):
        open_detector(moved)


def test_resolution_calibration_interpolates_in_log_diameter_and_holds_outside() -> None:
    cal = ResolutionCalibration(diameters=(200.0, 800.0), offsets={"sharpness": (-0.08, 0.0)})
    assert cal.offset("sharpness", 200.0) == pytest.approx(-0.08)
    assert cal.offset("sharpness", 400.0) == pytest.approx(-0.04)  # halfway in log(200)..log(800)
    assert cal.offset("sharpness", 100.0) == pytest.approx(-0.08)
    assert cal.offset("sharpness", 3000.0) == pytest.approx(0.0)
    assert cal.offset("lum_cv", 200.0) == 0.0
    assert cal.offset("sharpness", float("nan")) == 0.0
    with pytest.raises(ValueError):
        ResolutionCalibration(diameters=(800.0, 200.0), offsets={})


def test_a_small_photo_is_not_penalised_for_its_resolution(gate: GateParams) -> None:
    """A photo measured as a 224 px derivative (softer by the measured drift) scores as at camera resolution."""
    assert gate.calibration is not None
    lo, hi = gate.calibration.diameters[0], gate.calibration.diameters[-1]
    camera = dict.fromkeys(FEATURE_NAMES, 0.5)
    camera.update({name: gate.mean[i] for i, name in enumerate(gate.features)})
    small = {name: value + gate.calibration.offset(name, lo) for name, value in camera.items()}
    p_camera = gate.probability_ungradable({**camera, "fundus_diameter": hi})
    assert gate.probability_ungradable({**small, "fundus_diameter": lo}) == pytest.approx(p_camera)
    # Without the calibration the softer derivative would be judged as a soft camera photo.
    assert gate.probability_ungradable({**small, "fundus_diameter": hi}) != pytest.approx(p_camera)


# -- the referable override -------------------------------------------------------------------------------


def _refusing_gate(gate: GateParams, min_p_referable: float = 0.9) -> GateParams:
    """The shipped gate with a score cut-off that refuses the synthetic fundus by its score alone."""
    return replace(gate, threshold=1e-4, referable_override=ReferableOverride(min_p_referable))


def test_only_a_refusal_by_the_score_alone_may_be_outranked(fundus_rgb: np.ndarray, gate: GateParams) -> None:
    borderline = _assess(fundus_rgb, _refusing_gate(gate))
    assert borderline.is_fundus and not borderline.gradable and borderline.reasons
    assert borderline.model_may_outrank
    # The same photo under a gate without an override: refused, and final.
    assert not _assess(fundus_rgb, replace(gate, threshold=1e-4, referable_override=None)).model_may_outrank
    # A hard rule (too dark) is final whatever the score says.
    dark = np.clip(fundus_rgb.astype(np.float32) * 0.1 + 0.5, 0, 255).astype(np.uint8)
    assert not _assess(dark, _refusing_gate(gate)).model_may_outrank
    # Not a fundus is final.
    assert not _assess(fundus_rgb, _refusing_gate(gate), fundus_score=0.0).model_may_outrank
    # A gradable photo has nothing to outrank.
    assert not _assess(fundus_rgb, gate).model_may_outrank


def test_a_confident_referable_answer_turns_a_score_refusal_into_a_warning(
    fundus_rgb: np.ndarray, gate: GateParams
) -> None:
    strict = _refusing_gate(gate, 0.9)
    borderline = _assess(fundus_rgb, strict)
    graded = outrank_with_referable(borderline, 0.95, strict)
    assert graded.gradable and graded.warning and graded.is_fundus
    assert graded.reasons == borderline.reasons, "the warning says what is wrong with the photo"
    assert graded.score == borderline.score
    for p_referable in (0.89, float("nan")):
        assert outrank_with_referable(borderline, p_referable, strict) == borderline


def test_shipped_gate_lets_only_a_confident_referable_answer_outrank(gate: GateParams) -> None:
    assert gate.referable_override is not None
    assert gate.referable_override.min_p_referable >= 0.5, "far above the operating point, or healthy eyes pass"
    with pytest.raises(ValueError):
        ReferableOverride(1.5)
