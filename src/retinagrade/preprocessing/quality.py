"""The gate before grading: is this a fundus photograph at all, and is it good enough to grade?

Two decisions, both on cheap hand-crafted features of the raw-colour crop and of the fundus geometry:

1. **Not a fundus** (``is_fundus=False``): explainable rules. A colour fundus photograph is a bright,
   coloured field of view with dark corners around it, big enough to see vessels, with hardly any strongly
   green pixels. Each rule is a threshold on one feature, set well outside the feature's range over
   thousands of real fundus photographs (see ``retinagrade.training.fit_gate``).
2. **Ungradable** (``gradable=False``): a logistic regression for P(ungradable) fitted on EyeQ quality labels,
   plus hard rules with human-readable reason codes (too dark, overexposed, blurred, fundus cut off, low
   contrast). Serving needs only numpy: the standardisation, coefficients and thresholds are in a small JSON
   file (``models/gate.json``).

Features are relative where they can be (ratios, coefficients of variation, sharpness normalised by local
contrast) so that the gate fitted on contrast-equalised 256 px EyeQ derivatives transfers to raw camera JPEGs.
They are always measured on the crop resized to :data:`FEATURE_SIDE` pixels, so they do not depend on the
input resolution or on the model's input size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from retinagrade.preprocessing.decode import DecodedImage
from retinagrade.preprocessing.pipeline import PreparedImage

#: Side of the square crop all crop features are measured on.
FEATURE_SIDE: Final[int] = 224
#: Longest side of the thumbnail the surround (outside the field of view) is measured on.
_SURROUND_SIDE: Final[int] = 128
#: A pixel whose brightest channel is below this (0-255) counts as black surround / underexposed.
_DARK_LEVEL: Final[float] = 25.0
#: A pixel whose brightest channel reaches this counts as saturated.
_SATURATED_LEVEL: Final[float] = 250.0
#: A pixel is "strongly green" when green exceeds red and blue by this much (0-1 scale).
_GREEN_MARGIN: Final[float] = 0.25
#: Outside the disc, a pixel also counts as dark below this fraction of the disc's median brightness.
_RELATIVE_DARK: Final[float] = 0.35
_EPS: Final[float] = 1e-6

# Stable reason codes. The API and the reports quote them; never rename one.
REASON_NOT_FUNDUS: Final[str] = "not_fundus"
REASON_FUNDUS_NOT_FOUND: Final[str] = "fundus_not_found"
REASON_TOO_SMALL: Final[str] = "image_too_small"
REASON_GRAYSCALE: Final[str] = "grayscale"
REASON_NOT_FUNDUS_COLOUR: Final[str] = "not_fundus_colour"
REASON_NO_DARK_SURROUND: Final[str] = "no_dark_surround"
REASON_FOV_TOO_SMALL: Final[str] = "field_of_view_too_small"
REASON_TOO_DARK: Final[str] = "too_dark"
REASON_OVEREXPOSED: Final[str] = "overexposed"
REASON_BLURRED: Final[str] = "blurred"
REASON_CUT_OFF: Final[str] = "fundus_cut_off"
REASON_LOW_CONTRAST: Final[str] = "low_contrast"
REASON_UNEVEN_ILLUMINATION: Final[str] = "uneven_illumination"
REASON_LOW_QUALITY: Final[str] = "low_quality"

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
)

#: Which reason code explains a feature's push towards "ungradable" (for the model's dominant reason).
FEATURE_REASON: Final[Mapping[str, str]] = {
    "lum_mean": REASON_TOO_DARK,
    "lum_p05": REASON_TOO_DARK,
    "lum_p50": REASON_TOO_DARK,
    "lum_p95": REASON_OVEREXPOSED,
    "dark_fraction": REASON_TOO_DARK,
    "saturated_fraction": REASON_OVEREXPOSED,
    "lum_cv": REASON_LOW_CONTRAST,
    "detail_contrast": REASON_LOW_CONTRAST,
    "sharpness": REASON_BLURRED,
    "laplacian_rel": REASON_BLURRED,
    "illumination_cv": REASON_UNEVEN_ILLUMINATION,
    "visible_fraction": REASON_CUT_OFF,
    "fill_fraction": REASON_CUT_OFF,
}


def _masked_std(values: np.ndarray, mask: np.ndarray) -> float:
    selected = values[mask]
    return float(selected.std()) if selected.size else 0.0


def compute_quality_features(decoded: DecodedImage, prepared: PreparedImage) -> dict[str, float]:
    """Hand-crafted image-quality and fundus-likeness features (a few ms for a 224-448 px crop).

    Intensities are on a 0-1 scale. Crop features are measured inside the disc mask of the raw-colour crop
    resized to :data:`FEATURE_SIDE`; surround features on a thumbnail of the decoded image.

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
    vmax = pixels.max(axis=1)
    vmin = pixels.min(axis=1)
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
    }
    features.update(_surround_features(decoded.rgb, prepared, 255.0 * float(np.median(vmax))))
    return features


def _surround_features(rgb: np.ndarray, prepared: PreparedImage, disc_level: float) -> dict[str, float]:
    """How dark the frame is outside the field of view and in its four corners (a camera's black surround).

    A pixel counts as dark when its brightest channel is below ``max(25, 0.35 x disc_level)`` (0-255):
    relative, because EyeQ's equalisation lifts the black surround to a noisy dark purple.
    """
    geometry = prepared.geometry
    h, w = rgb.shape[:2]
    scale = min(1.0, _SURROUND_SIDE / max(h, w))
    if scale < 1.0:
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    else:
        small = rgb
    value = small.max(axis=2).astype(np.float32)
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


@dataclass(frozen=True)
class Rule:
    """A single-feature threshold: the rule fires when ``feature`` is below ``min`` or above ``max``."""

    feature: str
    reason: str
    min: float | None = None
    max: float | None = None

    def fires(self, features: Mapping[str, float]) -> bool:
        value = features[self.feature]
        if not math.isfinite(value):
            return True
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature, "reason": self.reason}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        lo, hi = data.get("min"), data.get("max")
        return cls(
            feature=str(data["feature"]),
            reason=str(data["reason"]),
            min=None if lo is None else float(lo),
            max=None if hi is None else float(hi),
        )


@dataclass(frozen=True)
class GateParams:
    """Everything the gate needs at serving time, fitted by ``retinagrade.training.fit_gate``.

    Attributes:
        features: names of the features the logistic regression uses, in coefficient order.
        mean, scale: standardisation of those features.
        coef, intercept: logistic regression for P(ungradable).
        threshold: an image is ungradable when P(ungradable) is at least this.
        not_fundus_rules: any rule firing means "not a fundus".
        ungradable_rules: any rule firing means "ungradable", whatever the model says.
        z_clip: standardised features are clipped to +-this, so one value far outside the training range
            (a camera JPEG is not an EyeQ image) cannot dominate the logit.
        meta: provenance (data, split, metrics); not used for decisions.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float
    not_fundus_rules: tuple[Rule, ...]
    ungradable_rules: tuple[Rule, ...]
    z_clip: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ValueError("GateParams: features, mean, scale and coef must have the same length.")
        unknown = {*self.features} | {rule.feature for rule in (*self.not_fundus_rules, *self.ungradable_rules)}
        unknown -= set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"GateParams: unknown feature(s) {sorted(unknown)}.")
        if not all(math.isfinite(v) and v > 0 for v in self.scale) or self.z_clip <= 0:
            raise ValueError("GateParams: scale and z_clip must be positive.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("GateParams: threshold must lie in (0, 1).")

    def probability_ungradable(self, features: Mapping[str, float]) -> float:
        """P(ungradable) from the logistic regression."""
        return float(1.0 / (1.0 + math.exp(-self.logit(features))))

    def logit(self, features: Mapping[str, float]) -> float:
        return self.intercept + float(np.dot(self.coef, self._standardised(features)))

    def contributions(self, features: Mapping[str, float]) -> dict[str, float]:
        """Each feature's additive share of the logit (coefficient x standardised value)."""
        z = self._standardised(features)
        return {name: float(c * v) for name, c, v in zip(self.features, self.coef, z, strict=True)}

    def _standardised(self, features: Mapping[str, float]) -> np.ndarray:
        x = np.asarray([features[name] for name in self.features], dtype=np.float64)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.clip(
            np.nan_to_num(z, nan=self.z_clip, posinf=self.z_clip, neginf=-self.z_clip),
            -self.z_clip,
            self.z_clip,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "threshold": self.threshold,
            "not_fundus_rules": [rule.to_dict() for rule in self.not_fundus_rules],
            "ungradable_rules": [rule.to_dict() for rule in self.ungradable_rules],
            "z_clip": self.z_clip,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateParams:
        return cls(
            features=tuple(str(v) for v in data["features"]),
            mean=tuple(float(v) for v in data["mean"]),
            scale=tuple(float(v) for v in data["scale"]),
            coef=tuple(float(v) for v in data["coef"]),
            intercept=float(data["intercept"]),
            threshold=float(data["threshold"]),
            not_fundus_rules=tuple(Rule.from_dict(r) for r in data["not_fundus_rules"]),
            ungradable_rules=tuple(Rule.from_dict(r) for r in data["ungradable_rules"]),
            z_clip=float(data.get("z_clip", 5.0)),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> GateParams:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass(frozen=True)
class QualityAssessment:
    """The gate's verdict on one image.

    Attributes:
        is_fundus: whether the image looks like a colour fundus photograph.
        gradable: whether it is a fundus good enough to grade (always False when not a fundus).
        score: 1 - P(ungradable), in [0, 1]; higher is better. Filled even for non-fundus images.
        reasons: stable reason codes; empty for a gradable fundus. ``not_fundus`` comes first when not a
            fundus, followed by the specific codes.
    """

    is_fundus: bool
    gradable: bool
    score: float
    reasons: tuple[str, ...]


def _unique(codes: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(codes))


def decide(features: Mapping[str, float], params: GateParams) -> QualityAssessment:
    """The gate's decision from precomputed features (what :func:`assess_quality` does after measuring)."""
    score = 1.0 - params.probability_ungradable(features)
    not_fundus = [rule.reason for rule in params.not_fundus_rules if rule.fires(features)]
    if not_fundus:
        return QualityAssessment(False, False, score, _unique([REASON_NOT_FUNDUS, *not_fundus]))
    reasons = [rule.reason for rule in params.ungradable_rules if rule.fires(features)]
    if score <= 1.0 - params.threshold and not reasons:
        reasons.append(_dominant_reason(features, params))
    return QualityAssessment(True, not reasons, score, _unique(reasons))


def _dominant_reason(features: Mapping[str, float], params: GateParams) -> str:
    """The reason family whose features push the logit furthest towards "ungradable"."""
    totals: dict[str, float] = {}
    for name, value in params.contributions(features).items():
        reason = FEATURE_REASON.get(name, REASON_LOW_QUALITY)
        totals[reason] = totals.get(reason, 0.0) + value
    reason, push = max(totals.items(), key=lambda item: item[1])
    return reason if push > 0.0 else REASON_LOW_QUALITY


def assess_quality(decoded: DecodedImage, prepared: PreparedImage, params: GateParams) -> QualityAssessment:
    """Decide whether ``decoded`` is a fundus photograph and whether it is gradable.

    Args:
        decoded: the image as decoded (used for its size and for the surround of the field of view).
        prepared: the output of :func:`retinagrade.preprocessing.pipeline.prepare` for ``decoded``.
        params: the fitted gate (:meth:`GateParams.from_json` on ``models/gate.json``).
    """
    return decide(compute_quality_features(decoded, prepared), params)
