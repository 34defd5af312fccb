"""Class-activation heatmaps from the network's own last feature map and head weights.

The exported network returns, for each output, the map whose spatial mean *is* that output (a linear head on
globally averaged features), so the heatmap costs nothing extra and explains the actual prediction. The
evidence map shown is that of the regression output, which rises with severity whatever grade is predicted.
"""

from __future__ import annotations

import cv2
import numpy as np


def evidence_map(cam: np.ndarray, size: int, channel: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Severity evidence as an S x S float32 map in [0, 1] (0 = none), from one image's C x h x w ``cam``.

    ``channel`` is the regression (severity) map's index in ``cam``: the spec's ``severity_channel``.

    Values are relative to the image's own strongest evidence above its median, so a healthy eye still shows
    where its (weak) evidence lies; the absolute strength is in the grade probabilities.
    """
    severity = cam[channel].astype(np.float32)
    relative = severity - float(np.median(severity))
    relative = np.maximum(relative, 0.0)
    peak = float(relative.max())
    heat = relative / peak if peak > 0 else relative
    heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_CUBIC)
    heat = np.clip(heat, 0.0, 1.0)
    if mask is not None:
        heat = heat * mask
    return np.asarray(heat)


def overlay(rgb: np.ndarray, heat: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heatmap over an RGB image (both S x S); returns RGB uint8."""
    levels = np.round(heat * 255).astype(np.uint8)
    colours = np.asarray(cv2.applyColorMap(levels, cv2.COLORMAP_JET))[:, :, ::-1]
    alpha = (opacity * np.clip(heat * 1.5, 0, 1))[:, :, None]
    blended = np.clip(rgb * (1 - alpha) + colours * alpha, 0, 255)
    return blended.astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
