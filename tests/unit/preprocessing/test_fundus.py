"""Locating, cropping and normalising the fundus: synthetic photos with a known field of view, real ones."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from retinagrade.preprocessing.decode import load_image
from retinagrade.preprocessing.fundus import (
    crop_to_fundus,
    disc_mask,
    enhance_local_contrast,
    locate_fundus,
    to_tensor,
)

# (width, height, cx, cy, rx, ry): centres and radii in pixels.
GEOMETRIES = {
    "centred": (800, 600, 400, 300, 250, 250),
    "off-centre": (800, 600, 330, 280, 200, 200),
    "cut top and bottom": (900, 600, 450, 300, 400, 400),
    "cut, centre above middle": (900, 600, 450, 270, 400, 400),
    "wide black borders": (1000, 600, 500, 300, 200, 200),
    "thin black border": (620, 620, 310, 310, 300, 300),
    "vertically stretched (resized)": (224, 224, 112, 112, 90, 110),
    "stretched and cut (resized)": (224, 224, 112, 112, 84, 130),
}


def _assert_geometry(geometry, cx, cy, rx, ry, tolerance=0.03):
    radius = min(rx, ry)
    assert geometry.found
    assert abs(geometry.cx - cx) <= tolerance * radius
    assert abs(geometry.cy - cy) <= tolerance * radius
    assert abs(geometry.rx - rx) <= tolerance * rx
    assert abs(geometry.ry - ry) <= tolerance * ry


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_locates_known_field_of_view(synthetic_fundus, name):
    w, h, cx, cy, rx, ry = GEOMETRIES[name]
    _assert_geometry(locate_fundus(synthetic_fundus(w, h, cx, cy, rx, ry=ry)), cx, cy, rx, ry)


def test_locates_dark_fundus(synthetic_fundus):
    img = synthetic_fundus(800, 600, 400, 300, 250, brightness=0.12)
    assert 15 <= img[300, 300].max() <= 35
    _assert_geometry(locate_fundus(img), 400, 300, 250, 250)


@pytest.mark.parametrize("side", ["right", "left", "top", "bottom"])
def test_rim_notch_does_not_move_the_disc(synthetic_fundus, side):
    _assert_geometry(locate_fundus(synthetic_fundus(800, 600, 400, 300, 250, notch=side)), 400, 300, 250, 250)


def test_rim_notch_on_a_cut_disc(synthetic_fundus):
    img = synthetic_fundus(900, 600, 450, 300, 400, notch="right")
    _assert_geometry(locate_fundus(img), 450, 300, 400, 400)


def test_visible_fraction_of_cut_disc(synthetic_fundus):
    geometry = locate_fundus(synthetic_fundus(900, 600, 450, 300, 400))
    # Area of a circle of radius 400 between two chords 300 from its centre, over the whole circle.
    t = 300 / 400
    expected = (2 / np.pi) * (t * np.sqrt(1 - t * t) + np.arcsin(t))
    assert geometry.visible_fraction == pytest.approx(expected, abs=0.02)
    assert geometry.fill_fraction > 0.97


def test_nothing_to_find_in_a_black_image():
    assert not locate_fundus(np.zeros((300, 400, 3), np.uint8)).found


def test_crop_is_square_and_masks_the_disc(synthetic_fundus):
    img = synthetic_fundus(800, 600, 330, 280, 200)
    crop = crop_to_fundus(img, locate_fundus(img), 224)
    assert crop.image.shape == (224, 224, 3)
    assert crop.image.dtype == np.uint8
    assert crop.mask.shape == (224, 224)
    assert crop.mask.mean() == pytest.approx(np.pi / 4, abs=0.01)
    assert np.all(crop.image[~crop.mask] == 0)
    # Inside, the disc's colour reaches the rim.
    inner = disc_mask(224, 0.05)
    assert crop.image[inner][:, 0].min() > 60


def test_crop_of_cut_disc_masks_out_what_the_frame_cut_off(synthetic_fundus):
    img = synthetic_fundus(900, 600, 450, 300, 400)
    crop = crop_to_fundus(img, locate_fundus(img), 200)
    # The frame cuts 100 px (of the 800 px diameter: 25 of 200) off the top and the bottom of the disc.
    assert not crop.mask[:23].any()
    assert not crop.mask[-23:].any()
    assert crop.mask[27:173, 100].all()
    assert crop.mask[100, 2:198].all()


def test_crop_of_stretched_disc_is_round(synthetic_fundus):
    img = synthetic_fundus(224, 224, 112, 112, 84, ry=130)
    crop = crop_to_fundus(img, locate_fundus(img), 256)
    lit = crop.image.max(axis=2) > 30
    # The disc's width equals its height would be, had the frame not cut it: compare the ellipse's rows.
    row = lit[128]
    assert row.sum() == pytest.approx(256, abs=6)
    # 0.3 of the radius above the centre, a round disc is 2 * sqrt(1 - 0.09) of the radius wide.
    assert lit[128 - 38].sum() == pytest.approx(256 * np.sqrt(1 - (38 / 128) ** 2), abs=6)


def test_enhance_is_neutral_outside_and_has_no_bright_rim(synthetic_fundus):
    flat = np.zeros((600, 600, 3), np.uint8)
    yy, xx = np.mgrid[0:600, 0:600]
    flat[(xx - 300) ** 2 + (yy - 300) ** 2 <= 280**2] = (190, 80, 40)
    crop = crop_to_fundus(flat, locate_fundus(flat), 224)
    out = enhance_local_contrast(crop, sigma_fraction=1 / 30, weight=4.0, mask_margin=0.03)
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    assert np.all(out[~crop.mask] == 128)
    kept = disc_mask(224, 0.03) & crop.mask
    rim = kept & ~disc_mask(224, 0.12)
    assert np.abs(out[rim].astype(float) - 128).mean() < 3
    assert np.abs(out[kept].astype(float) - 128).mean() < 2


def test_enhance_keeps_vessels_visible(synthetic_fundus):
    img = synthetic_fundus(600, 600, 300, 300, 280)
    crop = crop_to_fundus(img, locate_fundus(img), 224)
    out = enhance_local_contrast(crop, sigma_fraction=1 / 30, weight=4.0, mask_margin=0.03)
    inside = out[disc_mask(224, 0.1)][:, 1].astype(float)
    assert inside.min() < 90  # vessels are darker than their surroundings
    assert np.median(inside) == pytest.approx(128, abs=10)


def test_to_tensor_layout_and_normalisation():
    images = [np.full((8, 8, 3), (0, 128, 255), np.uint8), np.full((8, 8, 3), 128, np.uint8)]
    batch = to_tensor(images, (128.0, 128.0, 128.0), (128.0, 128.0, 128.0))
    assert batch.shape == (2, 3, 8, 8)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    assert batch[0, :, 0, 0].tolist() == pytest.approx([-1.0, 0.0, 127 / 128])
    assert np.all(batch[1] == 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_to_tensor_gives_the_bits_of_stack_convert_normalise_transpose(dtype: type) -> None:
    rng = np.random.default_rng(3)
    images = [(rng.random((16, 16, 3)) * 255).astype(dtype) for _ in range(3)]
    images.append(images[0][:, ::-1])  # a flipped view, as training's augmentation makes
    mean, std = (128.0, 120.5, 131.25), (128.0, 60.3, 77.7)
    plain = np.stack(images).astype(np.float32)
    plain -= np.asarray(mean, np.float32)
    plain /= np.asarray(std, np.float32)
    assert np.array_equal(to_tensor(images, mean, std), plain.transpose(0, 3, 1, 2))


# -- Real photographs --------------------------------------------------------------------------------------


def _images(folder: Path, every: int = 1, limit: int | None = None) -> list[Path]:
    with (folder / "labels.csv").open() as f:
        rows = [folder / row["image"] for row in csv.DictReader(f)]
    return rows[::every][:limit]


def _real_fundus_paths(root: Path) -> list[Path]:
    aptos = _images(root / "aptos2019-224")
    eyepacs = _images(root / "eyepacs-768")
    return [
        *_images(root / "raw-fundus-samples"),
        *aptos[:: max(1, len(aptos) // 30)][:30],
        *eyepacs[:: max(1, len(eyepacs) // 30)][:30],
        root / "non-fundus" / "images" / "retina.jpg",
    ]


@pytest.mark.shared_data
def test_finds_the_fundus_in_real_photographs(shared_data):
    failures = []
    for path in _real_fundus_paths(shared_data):
        rgb = load_image(path, min_side=448).rgb
        geometry = locate_fundus(rgb)
        crop = crop_to_fundus(rgb, geometry, 128)
        # The crop's mask covers what of the disc the frame shows: compare with the whole disc's area.
        covered = crop.mask.sum() / disc_mask(128).sum()
        if not (geometry.found and geometry.image_fraction > 0.3 and covered > 0.7):
            failures.append(f"{path.name}: {geometry} mask covers {covered:.2f}")
    assert not failures, "\n".join(failures)
