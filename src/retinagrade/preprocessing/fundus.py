"""Find the circular field of view of a fundus photograph, crop to it and normalise it for the model.

The same functions run in training, evaluation, the CLI and the service, so a 224 px resized training image
and a 12 MP camera JPEG reach the model in the same form: the fundus disc filling a square, its illumination
flattened by local-average subtraction (Graham, Kaggle DR 2015), the outside of the disc a flat grey.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

#: Longest side of the thumbnail the field of view is searched on.
_LOCATE_SIDE = 256


@dataclass(frozen=True)
class FundusGeometry:
    """Where the fundus lies in an image, in that image's pixel coordinates.

    The field of view is modelled as an axis-aligned ellipse (a circle for an undistorted photo; resized
    training sets sometimes stretch it). Parts of it may lie outside the frame (discs cut at top and bottom).

    Attributes:
        found: whether a plausible bright field of view was found at all.
        cx, cy: centre.
        rx, ry: horizontal and vertical radii.
        visible_fraction: share of the ellipse's area that lies inside the image frame.
        fill_fraction: share of the ellipse's in-frame area that is bright (a full disc is close to 1).
        image_fraction: share of the image that is field of view.
    """

    found: bool
    cx: float
    cy: float
    rx: float
    ry: float
    visible_fraction: float
    fill_fraction: float
    image_fraction: float


@dataclass(frozen=True)
class FundusCrop:
    """A square crop of the field of view.

    Attributes:
        image: S x S x 3 uint8 RGB, the disc inscribed in the square, outside black.
        mask: S x S bool, True inside the disc and inside the original frame.
    """

    image: np.ndarray
    mask: np.ndarray


def brightest_channel(rgb: np.ndarray) -> np.ndarray:
    """H x W maximum over the three channels (``rgb.max(axis=2)``, which numpy reduces pixel by pixel, 10x slower)."""
    brightest: np.ndarray = np.maximum(np.maximum(rgb[:, :, 0], rgb[:, :, 1]), rgb[:, :, 2])
    return brightest


def _foreground_mask(small: np.ndarray) -> np.ndarray:
    """Bright-enough pixels of a thumbnail, against the dark camera background."""
    value = brightest_channel(small).astype(np.float32)
    h, w = value.shape
    k = max(2, min(h, w) // 16)
    corners = np.concatenate(
        [value[:k, :k].ravel(), value[:k, -k:].ravel(), value[-k:, :k].ravel(), value[-k:, -k:].ravel()]
    )
    background = float(np.median(corners))
    bright = float(np.percentile(value, 90))
    threshold = background + max(4.0, 0.12 * (bright - background))
    mask: np.ndarray = (value > threshold).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    # Padding by replication: OpenCV's default border counts as foreground when closing, which would glue a
    # disc lying a few pixels from the frame edge to that edge (and make it look cut by the frame).
    pad = 6
    mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
    return np.ascontiguousarray(mask[pad:-pad, pad:-pad])


def _remove_rim_tabs(region: np.ndarray, diameter: int) -> np.ndarray:
    """Open the region with a disc of ``diameter`` pixels: removes tabs some cameras print on the rim.

    Replicated padding keeps the straight edges where the frame cuts the disc from being rounded off.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))
    pad = diameter
    padded = cv2.copyMakeBorder(region.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    opened = cv2.morphologyEx(padded, cv2.MORPH_OPEN, kernel)[pad:-pad, pad:-pad]
    return opened.astype(bool)


def _fit_cut_ellipse(region: np.ndarray) -> tuple[float, float] | None:
    """Centre row and vertical/horizontal radius ratio of a disc cut by the top or bottom of the frame.

    Each row's half-width ``w`` obeys ``w^2 = rx^2 (1 - (y - cy)^2 / ry^2)``, a parabola in ``y``; fitting it
    recovers ``cy`` and ``ry / rx`` for a round disc and for one stretched by resizing alike.
    Returns None when the rows do not look like a cut ellipse.
    """
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size < 8:
        return None
    left = np.argmax(region[rows], axis=1)
    right = region.shape[1] - np.argmax(region[rows, ::-1], axis=1)
    half_width_sq = ((right - left) / 2.0) ** 2
    c, b, a = np.polyfit(rows + 0.5, half_width_sq, 2)
    if c >= 0:
        return None
    cy = -b / (2.0 * c)
    rx_sq = a + b * cy + c * cy * cy
    if rx_sq <= 0:
        return None
    ratio = float(np.sqrt(-1.0 / c))
    if not 0.8 <= ratio <= 2.5:
        return None
    return float(cy), ratio


def locate_fundus(rgb: np.ndarray) -> FundusGeometry:
    """Locate the field of view: the largest bright region, fitted with a circle or ellipse.

    A disc cut by the top and bottom of the frame keeps its full width, so its radius is half the width and
    its centre row is where it is widest. A region taller than wide is taken as a vertically stretched disc.
    """
    h, w = rgb.shape[:2]
    scale = _LOCATE_SIDE / max(h, w)
    if scale < 1.0:
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    else:
        scale = 1.0
        small = rgb
    sh, sw = small.shape[:2]
    mask = _foreground_mask(small)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return FundusGeometry(False, w / 2, h / 2, w / 2, h / 2, 0.0, 0.0, 0.0)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x0, y0, bw, bh, area = (int(v) for v in stats[largest])
    region = labels == largest
    if area < 0.02 * sh * sw or bw < 8 or bh < 8:
        return FundusGeometry(False, w / 2, h / 2, w / 2, h / 2, 0.0, 0.0, area / (sh * sw))

    opened = _remove_rim_tabs(region, max(5, int(0.1 * min(bw, bh)) | 1))
    if opened.sum() > 0.5 * area:
        region = opened
        x0, y0, bw, bh = cv2.boundingRect(region.astype(np.uint8))

    cx = x0 + bw / 2.0
    rx = bw / 2.0
    cut = y0 == 0 or y0 + bh == sh
    fitted = _fit_cut_ellipse(region) if cut else None
    if fitted is not None:
        # Cut by the frame: round in camera images, vertically stretched in resized training sets.
        cy, ratio = fitted
        ry = rx * ratio
    elif bh >= 0.97 * bw:
        cy = y0 + bh / 2.0
        ry = bh / 2.0
    else:
        # Cut by the frame (or off-centre): the widest rows hold the centre.
        row_widths = region.sum(axis=1)
        widest = np.flatnonzero(row_widths >= 0.99 * row_widths.max())
        cy = float(widest.mean()) + 0.5
        ry = rx

    yy, xx = np.ogrid[0:sh, 0:sw]
    inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    ellipse_area = np.pi * rx * ry
    in_frame = float(inside.sum())
    visible = min(1.0, in_frame / ellipse_area)
    fill = float((region & inside).sum()) / max(in_frame, 1.0)
    inv = 1.0 / scale
    return FundusGeometry(
        found=True,
        cx=cx * inv,
        cy=cy * inv,
        rx=rx * inv,
        ry=ry * inv,
        visible_fraction=visible,
        fill_fraction=fill,
        image_fraction=area / (sh * sw),
    )


def disc_mask(size: int, margin: float = 0.0) -> np.ndarray:
    """Boolean S x S mask of the disc inscribed in the square, shrunk by ``margin`` (a fraction of the radius)."""
    c = (size - 1) / 2.0
    r = size / 2.0 * (1.0 - margin)
    yy, xx = np.ogrid[0:size, 0:size]
    return ((xx - c) ** 2 + (yy - c) ** 2) <= r * r


@lru_cache(maxsize=16)
def _shared_disc_mask(size: int, margin: float = 0.0) -> np.ndarray:
    """:func:`disc_mask`, computed once per size and margin (every image of a model has the same); read-only."""
    mask = disc_mask(size, margin)
    mask.setflags(write=False)
    return mask


def crop_to_fundus(rgb: np.ndarray, geometry: FundusGeometry, size: int) -> FundusCrop:
    """Cut the field of view's bounding square out of ``rgb`` and resize it to ``size`` x ``size``.

    Parts of the disc outside the frame are padded black and left out of the mask.
    """
    h, w = rgb.shape[:2]
    x0 = round(geometry.cx - geometry.rx)
    x1 = round(geometry.cx + geometry.rx)
    y0 = round(geometry.cy - geometry.ry)
    y1 = round(geometry.cy + geometry.ry)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x1 - w), max(0, y1 - h)
    crop = rgb[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    frame: np.ndarray = np.full(crop.shape[:2], 255, np.uint8)
    if pad_l or pad_t or pad_r or pad_b:
        crop = cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        frame = cv2.copyMakeBorder(frame, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_CONSTANT, value=0)
    shrinking = crop.shape[0] > size or crop.shape[1] > size
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    square = cv2.resize(crop, (size, size), interpolation=interp)
    frame_sq = cv2.resize(frame, (size, size), interpolation=cv2.INTER_NEAREST) > 127
    mask = _shared_disc_mask(size) & frame_sq
    # Zeroing by multiplication: the same pixels as ``square[~mask] = 0``, without a boolean gather.
    np.multiply(square, mask[:, :, None], out=square)
    return FundusCrop(image=np.ascontiguousarray(square), mask=mask)


def enhance_local_contrast(
    crop: FundusCrop,
    *,
    sigma_fraction: float,
    weight: float,
    mask_margin: float,
) -> np.ndarray:
    """Subtract the local average colour (Graham's method) to even out illumination and camera colour.

    ``out = weight * (img - gaussian(img)) + 128`` inside the disc, 128 outside. The Gaussian is a normalised
    convolution over the disc only, so the black surround does not paint a bright ring at the rim.
    Returns S x S x 3 uint8.
    """
    size = crop.image.shape[0]
    sigma = max(0.5, sigma_fraction * size)
    img = crop.image.astype(np.float32)
    keep = crop.mask & _shared_disc_mask(size, mask_margin)
    # The local average is taken over the kept disc only: the rim band holds the edge's anti-aliasing and any
    # sliver of black background a slightly large fit lets in, and each dark pixel there paints a bright ring.
    m = keep.astype(np.float32)
    # Blurring at a quarter of the size and upsampling is ~15x cheaper and indistinguishable at this sigma.
    small_side = max(8, size // 4)
    factor = size / small_side
    small_img = cv2.resize(img * m[:, :, None], (small_side, small_side), interpolation=cv2.INTER_AREA)
    small_m = cv2.resize(m, (small_side, small_side), interpolation=cv2.INTER_AREA)
    blur_img = cv2.GaussianBlur(small_img, (0, 0), sigma / factor)
    blur_m = cv2.GaussianBlur(small_m, (0, 0), sigma / factor)
    local_mean = blur_img / np.maximum(blur_m, 1e-3)[:, :, None]
    local_mean = cv2.resize(local_mean, (size, size), interpolation=cv2.INTER_LINEAR)
    out = weight * (img - local_mean) + 128.0
    out[~keep] = 128.0
    return np.asarray(np.clip(out + 0.5, 0, 255), dtype=np.uint8)


def to_tensor(
    images: list[np.ndarray], mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """Stack S x S x 3 uint8 images into a float32 N x 3 x S x S batch, normalised as the model expects."""
    # Each image is read once, straight into its channel-first place: the same float32 arithmetic as
    # stacking, converting, normalising and transposing in turn, at a fifth of the memory traffic.
    shift = np.asarray(mean, np.float32).reshape(3, 1, 1)
    batch = np.empty((len(images), 3, *images[0].shape[:2]), np.float32)
    for i, image in enumerate(images):
        # Anything but uint8 (exact in float32 anyway) is rounded to float32 first, as the stacked version did.
        values = image if image.dtype == np.uint8 else np.asarray(image, np.float32)
        np.subtract(values.transpose(2, 0, 1), shift, out=batch[i])
    batch /= np.asarray(std, np.float32).reshape(3, 1, 1)
    return batch
