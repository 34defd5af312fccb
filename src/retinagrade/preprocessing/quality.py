"""The gate before grading: is this a colour fundus photograph at all, and is it good enough to grade?

1. **Not a fundus** (``is_fundus=False``): a learned detector (:mod:`retinagrade.preprocessing.quality_detector`:
   a frozen ImageNet EfficientNet-Lite0 on a thumbnail of the whole image, its own ONNX file, and a logistic
   head), plus cheap explainable rules kept where they catch what the detector should never need to
   (grayscale, no field of view, tiny images). Each rule is a threshold on one feature set well outside the
   feature's range over thousands of real fundus photographs; negatives never set a rule.
2. **Ungradable** (``gradable=False``): "a grader could not assess DR in this image": too dark, too blurred to
   see vessels, field of view largely missing, heavy artefact. A logistic regression for P(ungradable) on
   relative features, fitted on EyeQ labels, plus hard rules with readable reason codes. The features drift
   with the resolution the photo really had (a 224 px photo looks soft next to a 3000 px one without being
   unreadable), so each feature is first corrected by the drift measured between the same photos at camera
   resolution and as 224 px derivatives (:class:`ResolutionCalibration`): small is not a defect.
3. **Graded despite quality** (``warning=True``): the disease itself lowers the quality features (haemorrhages,
   new vessels and vitreous haze read as low contrast and blur), so the score alone refuses the sickest eyes
   most often. A photo refused by the score (not by a hard rule, never as not a fundus) is still shown to the
   model, and a confident referable prediction outranks the refusal (:class:`ReferableOverride`, applied by
   :func:`outrank_with_referable` once the model has answered): the photo is graded and the answer carries
   the warning and the quality reasons.

Serving needs onnxruntime and numpy: every number is in ``models/gate.json``; the detector's ONNX file lies
beside it and is checked against the sha256 written there. Fitted by :mod:`retinagrade.training.gate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from retinagrade.errors import ModelError
from retinagrade.files import sha256_file
from retinagrade.preprocessing.decode import DecodedImage
from retinagrade.preprocessing.pipeline import PreparedImage
from retinagrade.preprocessing.quality_detector import DetectorBackbone, DetectorParams, FundusDetector
from retinagrade.preprocessing.quality_features import FEATURE_NAMES, SURROUND_SIDE, compute_quality_features, overview

__all__ = ["FEATURE_NAMES", "compute_quality_features"]

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
#: The learned detector found the image unlike colour fundus photographs (a face, an OCT scan, a skin lesion).
REASON_UNLIKE_FUNDUS: Final[str] = "unlike_fundus_photos"

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
class ResolutionCalibration:
    """Per-feature drift with the resolution a photo really had, removed before the gradability model.

    ``offsets[f][k]`` is how much feature ``f`` of a gradable photo whose field of view is ``diameters[k]``
    pixels across differs from the same photo at the reference resolution (the model's training domain).
    Between the knots the offset is interpolated in log-diameter; beyond them it is held constant.

    Attributes:
        diameters: increasing field-of-view diameters (stored pixels) at which the drift was measured.
        offsets: per feature, one offset per diameter, in the feature's own units.
    """

    diameters: tuple[float, ...]
    offsets: dict[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        if len(self.diameters) < 1 or any(b <= a for a, b in zip(self.diameters, self.diameters[1:], strict=False)):
            raise ValueError("ResolutionCalibration: diameters must be increasing.")
        if any(len(v) != len(self.diameters) for v in self.offsets.values()):
            raise ValueError("ResolutionCalibration: one offset per diameter.")

    def offset(self, feature: str, diameter: float) -> float:
        knots = self.offsets.get(feature)
        if knots is None or not math.isfinite(diameter) or diameter <= 0:
            return 0.0
        x = np.log(np.asarray(self.diameters))
        return float(np.interp(math.log(diameter), x, np.asarray(knots)))

    def to_dict(self) -> dict[str, Any]:
        return {"diameters": list(self.diameters), "offsets": {k: list(v) for k, v in self.offsets.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolutionCalibration:
        return cls(
            diameters=tuple(float(v) for v in data["diameters"]),
            offsets={str(k): tuple(float(x) for x in v) for k, v in dict(data["offsets"]).items()},
        )


@dataclass(frozen=True)
class ReferableOverride:
    """When a confident referable prediction outranks the gradability score's refusal.

    The score reads the haze and contrast of proliferative disease as poor quality: on the development data it
    refused 5 of 52 proliferative Mexican photos against 10 of 398 healthy ones, and 5 of 18 proliferative
    EyePACS camera photos, each of those 5 with P(referable) above 0.98 (docs/gate-report.md, "Refusals by true
    grade"). The lesions were plain to the model; "retake the photo" only delayed an urgent referral. Below the
    cut-off the refusal stands, and the hard rules always stand: they fire beyond every photo graders graded,
    and they are the gate's last defence against kinds of image the detector never saw (held-out dermoscopy
    photos that passed the detector were stopped by ``fundus_cut_off`` alone, two of them at P(referable) >= 0.9).

    Attributes:
        min_p_referable: calibrated P(referable grade or worse) at or above which a photo the gradability score
            refused is graded anyway, with ``warning`` set.
    """

    min_p_referable: float

    def __post_init__(self) -> None:
        if not 0.0 < self.min_p_referable < 1.0:
            raise ValueError("ReferableOverride: min_p_referable must lie in (0, 1).")

    def to_dict(self) -> dict[str, Any]:
        return {"min_p_referable": self.min_p_referable}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferableOverride:
        return cls(min_p_referable=float(data["min_p_referable"]))


@dataclass(frozen=True)
class GateParams:
    """Everything the gate needs at serving time, fitted by :mod:`retinagrade.training.gate`.

    Attributes:
        features: names of the features the logistic regression uses, in coefficient order.
        mean, scale: standardisation of those features.
        coef, intercept: logistic regression for P(ungradable).
        threshold: an image is ungradable when P(ungradable) is at least this.
        not_fundus_rules: any rule firing means "not a fundus".
        ungradable_rules: any rule firing means "ungradable", whatever the model says.
        z_clip: standardised features are clipped to +-this, so one value far outside the training range
            (a camera JPEG is not an EyeQ image) cannot dominate the logit.
        detector: the learned not-a-fundus detector (None: rules only, as gates before it had).
        calibration: resolution drift removed from the gradability features (None: none).
        referable_override: when a confident referable prediction outranks a quality refusal (None: never, the
            gate's verdict is final as in gates before it).
        meta: provenance (data, split, metrics); not used for decisions.
        base_dir: the folder ``gate.json`` was read from; the detector's file is relative to it.
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
    detector: DetectorParams | None = None
    calibration: ResolutionCalibration | None = None
    referable_override: ReferableOverride | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    base_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ValueError("GateParams: features, mean, scale and coef must have the same length.")
        unknown = {*self.features} | {rule.feature for rule in (*self.not_fundus_rules, *self.ungradable_rules)}
        if self.calibration is not None:
            unknown |= set(self.calibration.offsets)
        unknown -= set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"GateParams: unknown feature(s) {sorted(unknown)}.")
        if not all(math.isfinite(v) and v > 0 for v in self.scale) or self.z_clip <= 0:
            raise ValueError("GateParams: scale and z_clip must be positive.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("GateParams: threshold must lie in (0, 1).")

    @property
    def detector_path(self) -> Path | None:
        if self.detector is None:
            return None
        return (self.base_dir or Path(".")) / self.detector.file

    def calibrated(self, features: Mapping[str, float]) -> dict[str, float]:
        """The gradability features with the resolution drift removed (the rules see the raw values)."""
        out = {name: float(features[name]) for name in self.features}
        if self.calibration is not None:
            diameter = float(features.get("fundus_diameter", math.nan))
            for name in out:
                out[name] -= self.calibration.offset(name, diameter)
        return out

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
        calibrated = self.calibrated(features)
        x = np.asarray([calibrated[name] for name in self.features], dtype=np.float64)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.clip(
            np.nan_to_num(z, nan=self.z_clip, posinf=self.z_clip, neginf=-self.z_clip),
            -self.z_clip,
            self.z_clip,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "threshold": self.threshold,
            "not_fundus_rules": [rule.to_dict() for rule in self.not_fundus_rules],
            "ungradable_rules": [rule.to_dict() for rule in self.ungradable_rules],
            "z_clip": self.z_clip,
        }
        if self.detector is not None:
            out["detector"] = self.detector.to_dict()
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.referable_override is not None:
            out["referable_override"] = self.referable_override.to_dict()
        out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> GateParams:
        detector = data.get("detector")
        calibration = data.get("calibration")
        override = data.get("referable_override")
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
            detector=None if detector is None else DetectorParams.from_dict(detector),
            calibration=None if calibration is None else ResolutionCalibration.from_dict(calibration),
            referable_override=None if override is None else ReferableOverride.from_dict(override),
            meta=dict(data.get("meta", {})),
            base_dir=base_dir,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> GateParams:
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), base_dir=path.parent)

    def with_detector(self, detector: DetectorParams | None) -> GateParams:
        return replace(self, detector=detector)


def open_detector(params: GateParams, threads: int = 1) -> FundusDetector | None:
    """The gate's detector, its ONNX file checked against the sha256 in ``gate.json``.

    Raises:
        ModelError: the file is missing or is not the one the head was fitted on.
    """
    path = params.detector_path
    if params.detector is None or path is None:
        return None
    if not path.is_file():
        raise ModelError(f"fundus-detector file {path.name} named by the gate does not exist")
    if sha256_file(path) != params.detector.sha256:
        raise ModelError(f"fundus-detector file {path.name} does not match the sha256 in the gate file")
    try:
        return FundusDetector(params.detector, DetectorBackbone(path, threads=threads))
    except Exception as exc:  # onnxruntime raises its own exception types for a corrupt graph
        raise ModelError(f"fundus-detector file {path.name} cannot be loaded: {exc}") from exc


@dataclass(frozen=True)
class QualityAssessment:
    """The gate's verdict on one image.

    Attributes:
        is_fundus: whether the image looks like a colour fundus photograph.
        gradable: whether it is a fundus to grade (always False when not a fundus; True when graded with a
            ``warning``).
        score: 1 - P(ungradable), in [0, 1]; higher is better. Filled even for non-fundus images.
        reasons: stable reason codes; empty for a gradable fundus without a warning. ``not_fundus`` comes first
            when not a fundus, followed by the specific codes. With a warning: what is wrong with the photo.
        fundus_score: the detector's P(colour fundus photograph), in [0, 1]; None for a gate without one.
        warning: graded although the gradability score refused the photo, because the model found referable
            disease with confidence (:func:`outrank_with_referable`): refer, and read the photo with care.
        model_may_outrank: refused by the gradability score alone, by a gate with a :class:`ReferableOverride`:
            the model still reads the photo, and a confident referable answer turns the refusal into a warning.
    """

    is_fundus: bool
    gradable: bool
    score: float
    reasons: tuple[str, ...]
    fundus_score: float | None = None
    warning: bool = False
    model_may_outrank: bool = False


def _unique(codes: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(codes))


def decide(features: Mapping[str, float], params: GateParams, fundus_score: float | None = None) -> QualityAssessment:
    """The gate's decision from precomputed features and the detector's P(fundus photo).

    Raises:
        ValueError: the gate has a detector but no ``fundus_score`` was given (never decide without it).
    """
    if params.detector is not None and fundus_score is None:
        raise ValueError("this gate has a fundus detector: pass its score")
    score = 1.0 - params.probability_ungradable(features)
    not_fundus = [rule.reason for rule in params.not_fundus_rules if rule.fires(features)]
    if params.detector is not None and fundus_score is not None and fundus_score < params.detector.threshold:
        not_fundus.append(REASON_UNLIKE_FUNDUS)
    if not_fundus:
        return QualityAssessment(False, False, score, _unique([REASON_NOT_FUNDUS, *not_fundus]), fundus_score)
    reasons = [rule.reason for rule in params.ungradable_rules if rule.fires(features)]
    # Only the score's refusal may be outranked: a hard rule fires beyond every photo graders graded.
    by_score_only = score <= 1.0 - params.threshold and not reasons
    if by_score_only:
        reasons.append(_dominant_reason(features, params))
    may_outrank = by_score_only and params.referable_override is not None
    return QualityAssessment(True, not reasons, score, _unique(reasons), fundus_score, model_may_outrank=may_outrank)


def outrank_with_referable(quality: QualityAssessment, p_referable: float, params: GateParams) -> QualityAssessment:
    """The verdict once the model has read a photo: a confident referable answer outranks a quality refusal.

    Args:
        quality: the gate's verdict before the model (:func:`decide`).
        p_referable: the model's calibrated P(referable grade or worse) for the photo.
        params: the gate, whose :class:`ReferableOverride` sets how confident is confident.

    Returns:
        ``quality`` unchanged, unless the gradability score alone refused the photo and ``p_referable`` reaches
        the override's cut-off: then gradable, with ``warning`` set and the quality reasons kept.
    """
    override = params.referable_override
    if not quality.model_may_outrank or override is None:
        return quality
    # Written so that a NaN probability never outranks anything.
    if not p_referable >= override.min_p_referable:
        return quality
    return replace(quality, gradable=True, warning=True, model_may_outrank=False)


def _dominant_reason(features: Mapping[str, float], params: GateParams) -> str:
    """The reason family whose features push the logit furthest towards "ungradable"."""
    totals: dict[str, float] = {}
    for name, value in params.contributions(features).items():
        reason = FEATURE_REASON.get(name, REASON_LOW_QUALITY)
        totals[reason] = totals.get(reason, 0.0) + value
    reason, push = max(totals.items(), key=lambda item: item[1])
    return reason if push > 0.0 else REASON_LOW_QUALITY


def assess_quality(
    decoded: DecodedImage, prepared: PreparedImage, params: GateParams, detector: FundusDetector | None = None
) -> QualityAssessment:
    """Decide whether ``decoded`` is a colour fundus photograph and whether it is gradable.

    Args:
        decoded: the image as decoded (the detector sees all of it; the rules its size and surround).
        prepared: the output of :func:`retinagrade.preprocessing.pipeline.prepare_fundus` for ``decoded``.
        params: the fitted gate (:meth:`GateParams.from_json` on ``models/gate.json``).
        detector: :func:`open_detector` of ``params``; required when the gate has one.
    """
    if params.detector is not None and detector is None:
        raise ValueError("this gate has a fundus detector: open it with open_detector(params)")
    # One thumbnail for the surround features and, when it has the same side, the detector (the same pixels).
    surround = overview(decoded.rgb, SURROUND_SIDE)
    fundus_score = detector.probability(decoded.rgb, surround) if detector is not None else None
    return decide(compute_quality_features(decoded, prepared, surround), params, fundus_score)
