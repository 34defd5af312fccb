"""Training-time augmentation of prepared (contrast-normalised, disc-in-square) model images.

A fundus has no canonical rotation at this scale, so any angle and a mirror image are valid; contrast,
colour-balance and blur jitter stand in for other cameras and resolutions.
"""

from __future__ import annotations

import cv2
import numpy as np

from retinagrade.preprocessing.fundus import disc_mask


def augment(image: np.ndarray, rng: np.random.Generator, mask_margin: float = 0.03) -> np.ndarray:
    """Return a randomly rotated, flipped, rescaled and photometrically jittered copy of ``image`` (S x S x 3 uint8)."""
    size = image.shape[0]
    angle = float(rng.uniform(0.0, 360.0))
    scale = float(rng.uniform(0.94, 1.08))
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), angle, scale)
    out = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128)
    )
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.4, 1.2)))
    deviation = out.astype(np.float32) - 128.0
    contrast = float(rng.uniform(0.75, 1.3))
    channel_gain = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    shift = rng.uniform(-6.0, 6.0, size=3).astype(np.float32)
    jittered = 128.0 + deviation * contrast * channel_gain + shift
    jittered[~disc_mask(size, mask_margin)] = 128.0
    return np.clip(jittered + 0.5, 0, 255).astype(np.uint8)
