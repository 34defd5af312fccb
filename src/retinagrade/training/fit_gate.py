"""Fit the quality / is-it-a-fundus gate and write ``models/gate.json`` and ``docs/gate-report.md``.

    python -m retinagrade.training.fit_gate [--data ../shared/data] [--out models/gate.json]
                                            [--report docs/gate-report.md] [--cache cache/gate]

Every image goes through exactly the serving path: ``decode_image(data, min_side=448)``, ``prepare()`` with
the default :class:`PreprocessConfig`, then :func:`compute_quality_features`.

* Not-fundus rules: each threshold is a low (or high) percentile of the feature over all fundus photographs
  (APTOS, EyePACS-768, EyeQ including its Reject images), widened by a fixed margin, so that a rule fires
  only on images unlike essentially every real fundus. The OOD images are never used to set a threshold;
  they are only counted afterwards.
* Ungradable: logistic regression on EyeQ (Reject vs Good+Usable), out-of-fold by patient (GroupKFold);
  the threshold keeps ``--keep`` of Good/Usable images gradable out of fold; hard rules at extreme
  percentiles of Good/Usable images add readable reasons.

scikit-learn is used here only; serving reads the JSON with numpy.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.preprocessing.decode import load_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, prepare
from retinagrade.preprocessing.quality import (
    FEATURE_NAMES,
    REASON_BLURRED,
    REASON_CUT_OFF,
    REASON_FUNDUS_NOT_FOUND,
    REASON_GRAYSCALE,
    REASON_LOW_CONTRAST,
    REASON_NO_DARK_SURROUND,
    REASON_NOT_FUNDUS_COLOUR,
    REASON_NOT_ROUND,
    REASON_OVEREXPOSED,
    REASON_TOO_DARK,
    REASON_TOO_SMALL,
    GateParams,
    Rule,
    compute_quality_features,
    decide,
)

#: Folders under the data root that hold fundus photographs (none of them may be called "not a fundus").
FUNDUS_SETS: tuple[str, ...] = ("aptos2019-224", "eyepacs-768", "eyepacs-eyeq-256", "raw-fundus-samples")
NON_FUNDUS_SET = "non-fundus"
EYEQ_SET = "eyepacs-eyeq-256"
#: Features the gradability model uses: relative measures that survive EyeQ's equalisation and cropping.
MODEL_FEATURES: tuple[str, ...] = (
    "lum_p05",
    "lum_p50",
    "dark_fraction",
    "saturated_fraction",
    "lum_cv",
    "detail_contrast",
    "sharpness",
    "laplacian_rel",
    "illumination_cv",
    "visible_fraction",
    "fill_fraction",
)
N_FOLDS = 5
SEED = 0


def default_data_root() -> Path:
    """``$RETINAGRADE_DATA`` if set, else the repository's sibling ``../shared/data``."""
    env = os.environ.get("RETINAGRADE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


@dataclass(frozen=True)
class Sample:
    """One labelled image of a data folder and its quality features."""

    dataset: str
    image: str
    kind: str
    quality: str
    patient: str
    features: dict[str, float]


def _read_labels(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def measure_image(path: Path, config: PreprocessConfig | None = None) -> dict[str, float]:
    """Features of one image file, through the serving path."""
    config = config or PreprocessConfig()
    decoded = load_image(path, min_side=config.decode_min_side)
    prepared = prepare(decoded, config)
    return compute_quality_features(decoded, prepared)


def _code_key() -> str:
    """Hash of the source of every module that determines the features (decode, locate, crop, measure)."""
    from retinagrade.preprocessing import decode, fundus, pipeline, quality

    digest = hashlib.sha256()
    for module in (decode, fundus, pipeline, quality):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def load_dataset(data_root: Path, name: str, cache_dir: Path | None = None) -> list[Sample]:
    """Measure every image of one data folder; features are cached as CSV under ``cache_dir`` if given.

    The cache is keyed by the folder name and invalidated when the preprocessing or feature code changes.
    """
    folder = data_root / name
    rows = _read_labels(folder)
    cache_file = cache_dir / f"{name}.json" if cache_dir is not None else None
    cached: dict[str, dict[str, float]] = {}
    if cache_file is not None and cache_file.exists():
        payload = json.loads(cache_file.read_text(encoding="utf-8"))
        if payload.get("code_key") == _code_key():
            cached = payload["features"]
    measured: dict[str, dict[str, float]] = {}
    samples = []
    for row in rows:
        image = row["image"]
        features = cached.get(image)
        if features is None:
            features = measure_image(folder / image)
        measured[image] = features
        samples.append(
            Sample(
                dataset=name,
                image=image,
                kind=row.get("kind", "fundus") or "fundus",
                quality=row.get("quality", ""),
                patient=row.get("patient", "") or image,
                features=features,
            )
        )
    if cache_file is not None and measured != cached:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(
            json.dumps({"code_key": _code_key(), "features": measured}), encoding="utf-8"
        )
    return samples


def feature_matrix(samples: Sequence[Sample], names: Sequence[str]) -> np.ndarray:
    return np.asarray([[s.features[n] for n in names] for s in samples], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# Not-fundus rules
# --------------------------------------------------------------------------------------------------------

#: (feature, reason, side, percentile of the fundus distribution, margin). The rule's threshold is the
#: percentile moved outwards by ``margin`` (in the feature's own units), so that it sits clearly outside
#: the fundus distribution instead of on its edge.
NOT_FUNDUS_RULE_SPECS: tuple[tuple[str, str, str, float, float], ...] = (
    ("found", REASON_FUNDUS_NOT_FOUND, "min", 0.0, 0.5),
    ("min_side", REASON_TOO_SMALL, "min", 0.0, 0.0),
    ("chroma", REASON_GRAYSCALE, "min", 0.1, 0.0),
    ("red_green_ratio", REASON_NOT_FUNDUS_COLOUR, "min", 0.1, 0.0),
    ("surround_dark_fraction", REASON_NO_DARK_SURROUND, "min", 0.1, 0.0),
    ("aspect", REASON_NOT_ROUND, "min", 0.1, 0.0),
)


def fit_not_fundus_rules(fundus: Sequence[Sample]) -> tuple[Rule, ...]:
    rules = []
    for feature, reason, side, pct, margin in NOT_FUNDUS_RULE_SPECS:
        values = np.asarray([s.features[feature] for s in fundus])
        if side == "min":
            threshold = float(np.percentile(values, pct)) - margin
            rules.append(Rule(feature, reason, min=_round(threshold)))
        else:
            threshold = float(np.percentile(values, 100.0 - pct)) + margin
            rules.append(Rule(feature, reason, max=_round(threshold)))
    return tuple(rules)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def evaluate_not_fundus(samples: Iterable[Sample], params: GateParams) -> dict[str, dict[str, Any]]:
    """Per data folder: how many images the gate calls "not a fundus", and which."""
    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        entry = out.setdefault(s.dataset, {"n": 0, "not_fundus": 0, "flagged": []})
        entry["n"] += 1
        verdict = decide(s.features, params)
        if not verdict.is_fundus:
            entry["not_fundus"] += 1
            entry["flagged"].append((s.image, s.kind, list(verdict.reasons)))
    return out
