"""Hand-crafted image-quality and fundus-likeness features of one decoded, prepared image.

Intensities are on a 0-1 scale. Features are relative where they can be (ratios, coefficients of variation,
sharpness normalised by local contrast) so that a gate fitted on contrast-equalised 256 px EyeQ derivatives
transfers to raw camera JPEGs. Crop features are always measured on the crop resized to :data:`FEATURE_SIDE`
pixels, so they do not depend on the model's input size; ``fundus_diameter`` records the resolution the
photo really had, which the gradability score is calibrated on (see :mod:`retinagrade.preprocessing.quality`).
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

from retinagrade.preprocessing.decode import DecodedImage
from retinagrade.preprocessing.fundus import brightest_channel
from retinagrade.preprocessing.pipeline import PreparedImage

#: Side of the square crop all crop features are measured on.
FEATURE_SIDE: Final[int] = 224
#: Longest side of the thumbnail the surround (outside the field of view) is measured on.
SURROUND_SIDE: Final[int] = 128
#: A pixel whose brightest channel is below this (0-255) counts as black surround / underexposed.
_DARK_LEVEL: Final[float] = 25.0
#: A pixel whose brightest channel reaches this counts as saturated.
_SATURATED_LEVEL: Final[float] = 250.0
#: A pixel is "strongly green" when green exceeds red and blue by this much (0-1 scale).
_GREEN_MARGIN: Final[float] = 0.25
#: Outside the disc, a pixel also counts as dark below this fraction of the disc's median brightness.
_RELATIVE_DARK: Final[float] = 0.35
_EPS: Final[float] = 1e-6

#: Feature names, in the order the logistic regression sees them when it uses all of them.
FEATURE_NAMES: Final[tuple[str, ...]] = (
    "lum_mean",
    "lum_p05",
    "lum_p50",
    "lum_p95",
    "dark_fraction",
    "saturated_fraction",
    "lum_cv",
    "detail_contrast",
    "sharpness",
    "laplacian_rel",
    "illumination_cv",
    "red_green_ratio",
    "green_blue_ratio",
    "saturation_mean",
    "chroma",
    "red_dominant_fraction",
    "found",
    "visible_fraction",
    "fill_fraction",
    "image_fraction",
    "aspect",
    "green_fraction",
    "surround_dark_fraction",
    "corner_dark_fraction",
    "min_side",
    "fundus_diameter",
)


def overview(rgb: np.ndarray, side: int) -> np.ndarray:
    """The whole image area-averaged down to a longer side of ``side`` pixels; ``rgb`` itself when not longer.

    The surround features and the gate's detector both start from this thumbnail: computed once, it serves both.
    """
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _masked_std(values: np.ndarray, mask: np.ndarray) -> float:
    selected = values[mask]
    return float(selected.std()) if selected.size else 0.0


def compute_quality_features(
    decoded: DecodedImage, prepared: PreparedImage, surround: np.ndarray | None = None
) -> dict[str, float]:
    """Hand-crafted image-quality and fundus-likeness features (a few ms for a 224-448 px crop).

    Intensities are on a 0-1 scale. Crop features are measured inside the disc mask of the raw-colour crop
    resized to :data:`FEATURE_SIDE`; surround features on a thumbnail of the decoded image, ``surround`` when
    the caller already made it (``overview(decoded.rgb, SURROUND_SIDE)``).

    Returns:
        One float per name in :data:`FEATURE_NAMES`.
    """
    geometry = prepared.geometry
    image = prepared.crop.image
    mask = prepared.crop.mask
    if image.shape[0] != FEATURE_SIDE:
        shrinking = image.shape[0] > FEATURE_SIDE
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (FEATURE_SIDE, FEATURE_SIDE), interpolation=interp)
        mask = cv2.resize(mask.astype(np.uint8), (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_NEAREST) > 0
    # The rim of the disc carries glare and the crop's black edge; measure a slightly eroded disc.
    inner = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    if inner.sum() < 64:
        inner = mask if mask.sum() >= 64 else np.ones_like(mask)

    pixels = image[inner].astype(np.float32) / 255.0  # N x 3, the disc only
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    lum_in = 0.299 * r + 0.587 * g + 0.114 * b
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    p05, p50, p95 = (float(v) for v in np.percentile(lum_in, (5, 50, 95)))
    lum_mean = float(lum_in.mean())
    mean_r, mean_g, mean_b = float(r.mean()), float(g.mean()), float(b.mean())

    # Detail at two scales on the green channel (vessels and lesions live there). Sharpness divides the
    # finest band by a coarser one, so a global gain (EyeQ's equalisation, exposure) cancels out.
    green = image[:, :, 1].astype(np.float32) / 255.0
    fine = green - cv2.GaussianBlur(green, (0, 0), 1.0)
    band = green - cv2.GaussianBlur(green, (0, 0), 4.0)
    fine_std = _masked_std(fine, inner)
    band_std = _masked_std(band, inner)
    laplacian = cv2.Laplacian(green, cv2.CV_32F, ksize=3)
    # Illumination: the luminance at a quarter of the resolution, smoothed over ~1/14 of the disc.
    lum_small = (
        cv2.resize(
            cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
            (FEATURE_SIDE // 4, FEATURE_SIDE // 4),
            interpolation=cv2.INTER_AREA,
        ).astype(np.float32)
        / 255.0
    )
    inner_small = cv2.resize(inner.astype(np.uint8), lum_small.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    illumination = cv2.GaussianBlur(lum_small, (0, 0), 4.0)

    features: dict[str, float] = {
        "lum_mean": lum_mean,
        "lum_p05": p05,
        "lum_p50": p50,
        "lum_p95": p95,
        "dark_fraction": float((vmax < _DARK_LEVEL / 255.0).mean()),
        "saturated_fraction": float((vmax >= _SATURATED_LEVEL / 255.0).mean()),
        "lum_cv": float(lum_in.std()) / (lum_mean + 0.02),
        "detail_contrast": band_std / (mean_g + 0.02),
        "sharpness": fine_std / (band_std + 1e-3),
        "laplacian_rel": _masked_std(laplacian, inner) / (mean_g + 0.02),
        "illumination_cv": _masked_std(illumination, inner_small) / (lum_mean + 0.02),
        "red_green_ratio": (mean_r + 0.01) / (mean_g + 0.01),
        "green_blue_ratio": (mean_g + 0.01) / (mean_b + 0.01),
        "saturation_mean": float(((vmax - vmin) / (vmax + 0.02)).mean()),
        "chroma": float((vmax - vmin).mean()) / (lum_mean + 0.02),
        "red_dominant_fraction": float(((r >= g) & (r >= b)).mean()),
        # Strongly green pixels: the retina reflects little green relative to red, even after EyeQ's
        # equalisation, while colour wheels, logos and foliage are full of them.
        "green_fraction": float(((g > r + _GREEN_MARGIN) & (g > b + _GREEN_MARGIN)).mean()),
        "found": 1.0 if geometry.found else 0.0,
        "visible_fraction": float(geometry.visible_fraction),
        "fill_fraction": float(geometry.fill_fraction),
        "image_fraction": float(geometry.image_fraction),
        "aspect": float(min(geometry.rx, geometry.ry) / max(geometry.rx, geometry.ry, _EPS)),
        "min_side": float(min(decoded.original_size)),
        # The resolution the photo really had: the field of view's smaller diameter in stored pixels (a
        # reduced-scale decode is undone), capped by the frame. A 224 px APTOS disc is ~224, a camera's ~1800.
        "fundus_diameter": float(
            min(2.0 * min(geometry.rx, geometry.ry), float(min(decoded.rgb.shape[:2]))) / max(decoded.scale, _EPS)
        ),
    }
    small = surround if surround is not None else overview(decoded.rgb, SURROUND_SIDE)
    features.update(_surround_features(decoded.rgb, small, prepared, 255.0 * float(np.median(vmax))))
    return features


def _surround_features(
    rgb: np.ndarray, small: np.ndarray, prepared: PreparedImage, disc_level: float
) -> dict[str, float]:
    """How dark the frame is outside the field of view and in its four corners (a camera's black surround).

    ``small`` is the thumbnail of ``rgb`` it is measured on. A pixel counts as dark when its brightest channel is
    below ``max(25, 0.35 x disc_level)`` (0-255): relative, because EyeQ's equalisation lifts the black
    surround to a noisy dark purple.
    """
    geometry = prepared.geometry
    h, w = rgb.shape[:2]
    value = brightest_channel(small).astype(np.float32)
    dark = value < max(_DARK_LEVEL, _RELATIVE_DARK * disc_level)
    sh, sw = value.shape
    # Corners: a circular field of view on a rectangular sensor leaves them black, also when the disc is
    # cut by the frame on every side (APTOS has such crops: only small black corner triangles remain).
    c = max(2, round(0.04 * min(sh, sw)))
    corners = (dark[:c, :c], dark[:c, -c:], dark[-c:, :c], dark[-c:, -c:])
    corner_dark = float(np.mean([patch.mean() for patch in corners]))
    sx, sy = sw / w, sh / h
    yy, xx = np.ogrid[0:sh, 0:sw]
    # A margin of 8 % of the radius keeps the blurred rim of the disc out of the surround.
    rx = max(geometry.rx * sx * 1.08, _EPS)
    ry = max(geometry.ry * sy * 1.08, _EPS)
    outside = ((xx + 0.5 - geometry.cx * sx) / rx) ** 2 + ((yy + 0.5 - geometry.cy * sy) / ry) ** 2 > 1.0
    # Nothing of the frame outside the disc: no evidence of a camera surround at all.
    surround_dark = float(dark[outside].mean()) if outside.sum() >= 16 else 0.0
    return {"surround_dark_fraction": surround_dark, "corner_dark_fraction": corner_dark}
