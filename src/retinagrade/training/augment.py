"""Training-time augmentation, in two places of the pipeline.

* :func:`fundus_artefacts` works on the *raw decoded photo*, before the fundus is located, cropped and
  contrast-normalised: it imitates what other cameras, operators and compression do to a photo (uneven
  illumination and vignetting, haze, defocus and motion blur, colour temperature and gamma, dust spots and
  rim halo, JPEG re-compression, down- then up-scaling), so the preprocessing sees them as it would in use.
* :func:`augment` works on the *prepared model image* (disc in a square, contrast-normalised): any rotation and
  a mirror image are valid for a fundus at this scale; contrast, colour-balance and blur jitter are light.
"""

from __future__ import annotations

import cv2
import numpy as np

from retinagrade.preprocessing.fundus import disc_mask

#: Bumped whenever :func:`fundus_artefacts` changes, so cached views are recomputed.
ARTEFACTS_VERSION = 1


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


def _illumination(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field: a linear gradient, a vignette falling off to the rim, or both."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = yy / max(h - 1, 1) * 2 - 1
    xx = xx / max(w - 1, 1) * 2 - 1
    field = np.ones((h, w), np.float32)
    if rng.random() < 0.7:
        angle = rng.uniform(0, 2 * np.pi)
        field *= 1.0 + float(rng.uniform(0.15, 0.5)) * (np.cos(angle) * xx + np.sin(angle) * yy)
    if rng.random() < 0.6:
        cy, cx = rng.uniform(-0.3, 0.3, size=2)
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        field *= 1.0 - float(rng.uniform(0.2, 0.6)) * np.clip(r2, 0, 1.5) / 1.5
    return np.clip(field, 0.2, 1.8)


def _light_and_colour(out: np.ndarray, rng: np.random.Generator, side: float) -> np.ndarray:
    """Uneven illumination and vignetting, haze, colour temperature and gain, gamma (float image)."""
    h, w = out.shape[:2]
    if rng.random() < 0.6:
        out *= _illumination((h, w), rng)[..., None]
    if rng.random() < 0.3:
        # haze / cataract-like veil: blend toward a blurred, brightened copy
        veil = cv2.GaussianBlur(out, (0, 0), side * 0.08) * float(rng.uniform(1.0, 1.3)) + float(rng.uniform(10, 40))
        alpha = float(rng.uniform(0.15, 0.45))
        out = out * (1 - alpha) + veil * alpha
    if rng.random() < 0.3:
        # colour temperature (red/blue balance) and overall gain
        warm = float(rng.uniform(-0.2, 0.2))
        out *= np.array([1 + warm, 1.0, 1 - warm], np.float32) * float(rng.uniform(0.8, 1.2))
    if rng.random() < 0.3:
        gamma = float(np.exp(rng.uniform(-0.45, 0.45)))
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    return out


def _spots_and_halo(out: np.ndarray, rng: np.random.Generator, side: float) -> np.ndarray:
    """Dust spots (soft bright or dark blobs) and a bright rim halo (float image)."""
    h, w = out.shape[:2]
    if rng.random() < 0.15:
        spots: np.ndarray = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 5))):
            centre = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
            cv2.circle(spots, centre, max(1, int(side * rng.uniform(0.01, 0.04))), float(rng.choice([-1.0, 1.0])), -1)
        spots = cv2.GaussianBlur(spots, (0, 0), side * 0.01 + 0.5)
        out += spots[..., None] * float(rng.uniform(20, 60))
    if rng.random() < 0.1:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
        ring = np.exp(-(((r - rng.uniform(0.8, 0.95)) / 0.06) ** 2)) * (r < 1.0)
        out += ring[..., None] * float(rng.uniform(10, 40))
    return out


def _blur(out: np.ndarray, rng: np.random.Generator, side: float) -> np.ndarray:
    """Defocus (Gaussian) or motion (rotated line kernel) blur, or neither (uint8 image)."""
    blur = rng.random()
    if blur < 0.2:
        return cv2.GaussianBlur(out, (0, 0), side * float(rng.uniform(0.002, 0.008)) + 0.3)
    if blur < 0.3:
        length = max(3, int(side * rng.uniform(0.005, 0.02)) | 1)
        kernel: np.ndarray = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        normalised = (kernel / max(float(kernel.sum()), 1e-6)).astype(np.float32)
        return cv2.filter2D(out, -1, normalised)
    return out


def _resample_and_compress(out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down- then up-scaling, and JPEG re-compression (uint8 RGB image)."""
    h, w = out.shape[:2]
    if rng.random() < 0.3:
        factor = float(rng.uniform(0.35, 0.75))
        small = cv2.resize(out, (max(16, int(w * factor)), max(16, int(h * factor))), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.4:
        bgr = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 85))])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is not None:
            out = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return out


def fundus_artefacts(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a copy of a raw photo (H x W x 3 uint8) with a random set of camera and acquisition artefacts.

    Each artefact fires with its own probability and strength; sizes are relative to the photo's shorter side
    so a 224 px and a 768 px copy of a photo are degraded alike.
    """
    side = float(min(rgb.shape[:2]))
    out = _spots_and_halo(_light_and_colour(rgb.astype(np.float32), rng, side), rng, side)
    return _resample_and_compress(_blur(np.clip(out, 0, 255).astype(np.uint8), rng, side), rng)
