"""Fit the quality / is-it-a-fundus gate and write ``models/gate.json`` and ``docs/gate-report.md``.

    python -m retinagrade.training.fit_gate [--data ../shared/data] [--out models/gate.json]
                                            [--report docs/gate-report.md] [--cache cache/gate]

Every image goes through exactly the serving path: ``decode_image(data, min_side=448)``, ``prepare()`` with
the default :class:`PreprocessConfig`, then :func:`compute_quality_features`.

* Not-fundus rules: each threshold is the minimum (maximum) of one feature over all fundus photographs
  (APTOS, EyePACS-768, EyeQ including its Reject images, raw samples), halved (doubled), so a rule fires only
  on images far outside every real fundus here. The OOD images never set a threshold; they are only counted.
* Ungradable: logistic regression on EyeQ (Reject vs Good+Usable), out-of-fold by patient (GroupKFold);
  the threshold keeps ``--keep`` of Good/Usable images gradable out of fold; hard rules beyond the 0.1 %
  tails of graded images add readable reasons.

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
    REASON_BLURRED,
    REASON_CUT_OFF,
    REASON_FOV_TOO_SMALL,
    REASON_FUNDUS_NOT_FOUND,
    REASON_GRAYSCALE,
    REASON_LOW_CONTRAST,
    REASON_NO_DARK_SURROUND,
    REASON_NOT_FUNDUS_COLOUR,
    REASON_OVEREXPOSED,
    REASON_TOO_DARK,
    REASON_TOO_SMALL,
    GateParams,
    QualityAssessment,
    Rule,
    compute_quality_features,
    decide,
)
from retinagrade.training.metrics import bootstrap_ci

#: Folders under the data root that hold fundus photographs (none of them may be called "not a fundus").
FUNDUS_SETS: tuple[str, ...] = ("aptos2019-224", "eyepacs-768", "eyepacs-eyeq-256", "raw-fundus-samples")
NON_FUNDUS_SET = "non-fundus"
EYEQ_SET = "eyepacs-eyeq-256"
#: Features the gradability model uses: relative measures that survive EyeQ's equalisation and cropping.
MODEL_FEATURES: tuple[str, ...] = (
    "sharpness",
    "laplacian_rel",
    "lum_cv",
    "detail_contrast",
    "illumination_cv",
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
class MeasuredImage:
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


def _code_key(config: PreprocessConfig) -> str:
    """Hash of the preprocessing config and of every module that determines the features."""
    from retinagrade.preprocessing import decode, fundus, pipeline, quality

    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for module in (decode, fundus, pipeline, quality):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def load_dataset(
    data_root: Path, name: str, cache_dir: Path | None = None, config: PreprocessConfig | None = None
) -> list[MeasuredImage]:
    """Measure every image of one data folder; features are cached as CSV under ``cache_dir`` if given.

    The cache is keyed by the folder name and invalidated when the preprocessing or feature code changes.
    """
    config = config or PreprocessConfig()
    folder = data_root / name
    rows = _read_labels(folder)
    cache_file = cache_dir / f"{name}.json" if cache_dir is not None else None
    cached: dict[str, dict[str, float]] = {}
    if cache_file is not None and cache_file.exists():
        payload = json.loads(cache_file.read_text(encoding="utf-8"))
        if payload.get("code_key") == _code_key(config):
            cached = payload["features"]
    measured: dict[str, dict[str, float]] = {}
    samples = []
    for row in rows:
        image = row["image"]
        features = cached.get(image)
        if features is None:
            features = measure_image(folder / image, config)
        measured[image] = features
        samples.append(
            MeasuredImage(
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
        cache_file.write_text(json.dumps({"code_key": _code_key(config), "features": measured}), encoding="utf-8")
    return samples


def feature_matrix(samples: Sequence[MeasuredImage], names: Sequence[str]) -> np.ndarray:
    return np.asarray([[s.features[n] for n in names] for s in samples], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# Not-fundus rules
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """How one threshold is derived from the fundus distribution of its feature.

    ``threshold = factor x percentile(feature, pct)`` over all fundus photographs (APTOS, EyePACS-768, EyeQ
    with its Reject images, the raw camera samples): for a ``min`` rule the minimum halved, for a ``max`` rule
    the maximum doubled, so a rule fires only on an image twice as far out as any real fundus photograph
    here, not on the edge of their range.
    """

    feature: str
    reason: str
    side: str  # "min" or "max"
    pct: float
    factor: float
    why: str


NOT_FUNDUS_RULE_SPECS: tuple[RuleSpec, ...] = (
    RuleSpec(
        "found",
        REASON_FUNDUS_NOT_FOUND,
        "min",
        0.0,
        0.5,
        "no bright field of view against a darker background was found",
    ),
    RuleSpec(
        "image_fraction",
        REASON_FOV_TOO_SMALL,
        "min",
        0.0,
        0.5,
        "the bright region covers too little of the frame to be a camera's field of view",
    ),
    RuleSpec(
        "min_side",
        REASON_TOO_SMALL,
        "min",
        0.0,
        0.5,
        "shorter side below half the smallest fundus image here (half the model input)",
    ),
    RuleSpec(
        "chroma",
        REASON_GRAYSCALE,
        "min",
        0.0,
        0.5,
        "no colour: grayscale or red-free images are not what the grader was trained on",
    ),
    RuleSpec(
        "corner_dark_fraction",
        REASON_NO_DARK_SURROUND,
        "min",
        0.0,
        0.5,
        "a circular field of view on a rectangular sensor leaves dark corners",
    ),
    # 1.5 rather than 2: the greenest fundus images are EyeQ's equalised ones (9 % strongly green pixels;
    # camera-colour fundus images: under 0.1 %), and doubling would pass a colour wheel (15 %).
    RuleSpec(
        "green_fraction",
        REASON_NOT_FUNDUS_COLOUR,
        "max",
        100.0,
        1.5,
        "the retina reflects little green relative to red; strongly green pixels are not retina",
    ),
)


def fit_not_fundus_rules(fundus: Sequence[MeasuredImage]) -> tuple[Rule, ...]:
    """Thresholds from the fundus distributions (see :class:`RuleSpec`); non-fundus images are not used."""
    rules = []
    for spec in NOT_FUNDUS_RULE_SPECS:
        values = np.asarray([s.features[spec.feature] for s in fundus])
        threshold = _round(spec.factor * float(np.percentile(values, spec.pct)))
        if spec.side == "min":
            rules.append(Rule(spec.feature, spec.reason, min=threshold))
        else:
            rules.append(Rule(spec.feature, spec.reason, max=threshold))
    return tuple(rules)


def _round(value: float) -> float:
    return float(f"{value:.4g}")


# --------------------------------------------------------------------------------------------------------
# Gradability
# --------------------------------------------------------------------------------------------------------

#: Hard ungradable rules: (feature, reason, side, percentile of gradable fundus photographs, factor). A rule
#: fires only beyond the 0.1 % tail of images that graders did grade (EyeQ Good/Usable, EyePACS-768
#: Good/Usable, APTOS), so it names an obvious defect and rarely overrules the model.
UNGRADABLE_RULE_SPECS: tuple[tuple[str, str, str, float, float], ...] = (
    ("lum_p50", REASON_TOO_DARK, "min", 0.1, 1.0),
    ("saturated_fraction", REASON_OVEREXPOSED, "max", 99.9, 1.0),
    ("sharpness", REASON_BLURRED, "min", 0.1, 1.0),
    # Halved: full-resolution camera JPEGs reduced to 224 px show less band-pass contrast than the
    # 224-768 px derivatives the percentile comes from (raw sample 373_left, a gradable photo, is at 0.032).
    ("detail_contrast", REASON_LOW_CONTRAST, "min", 0.1, 0.5),
    ("visible_fraction", REASON_CUT_OFF, "min", 0.1, 1.0),
)


def gradable_reference(samples: Iterable[MeasuredImage]) -> list[MeasuredImage]:
    """Images graders graded: EyeQ/EyePACS Good or Usable, and all of APTOS."""
    return [s for s in samples if s.quality in ("Good", "Usable") or (s.dataset == "aptos2019-224" and not s.quality)]


def fit_ungradable_rules(reference: Sequence[MeasuredImage]) -> tuple[Rule, ...]:
    rules = []
    for feature, reason, side, pct, factor in UNGRADABLE_RULE_SPECS:
        values = np.asarray([s.features[feature] for s in reference])
        threshold = _round(factor * float(np.percentile(values, pct)))
        rules.append(Rule(feature, reason, min=threshold) if side == "min" else Rule(feature, reason, max=threshold))
    return tuple(rules)


@dataclass(frozen=True)
class LogisticFit:
    """A standardised logistic regression, as plain numbers."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.clip((x - self.mean) / self.scale, -Z_CLIP, Z_CLIP)
        return np.asarray(1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept))))


#: Standardised features are clipped to this many standard deviations (also at serving time), so a value far
#: outside the training range cannot dominate the logit.
Z_CLIP = 5.0


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> LogisticFit:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.clip((x - mean) / scale, -Z_CLIP, Z_CLIP)
    model = LogisticRegression(C=c, max_iter=2000).fit(z, y)
    return LogisticFit(mean, scale, model.coef_[0].copy(), float(model.intercept_[0]))


def grouped_oof(
    x: np.ndarray, y: np.ndarray, groups: Sequence[str], n_folds: int = N_FOLDS, seed: int = SEED
) -> np.ndarray:
    """Out-of-fold P(ungradable): each image scored by a model that never saw its patient."""
    from sklearn.model_selection import GroupKFold

    oof = np.full(len(y), np.nan)
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups=np.asarray(groups)):
        oof[test] = fit_logistic(x[train], y[train]).predict(x[test])
    return oof


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), NaN with one class only."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, score))


def eyeq_samples(samples: Iterable[MeasuredImage]) -> list[MeasuredImage]:
    return [s for s in samples if s.dataset == EYEQ_SET and s.quality in ("Good", "Usable", "Reject")]


def eyeq_oof_auc(samples: Sequence[MeasuredImage]) -> tuple[float, np.ndarray, np.ndarray]:
    """Patient-grouped out-of-fold ROC AUC of the gradability model on EyeQ (Reject = positive)."""
    labelled = eyeq_samples(samples)
    x = feature_matrix(labelled, MODEL_FEATURES)
    y = np.asarray([s.quality == "Reject" for s in labelled], dtype=int)
    oof = grouped_oof(x, y, [s.patient for s in labelled])
    return roc_auc(y, oof), y, oof


def choose_threshold(oof: np.ndarray, y: np.ndarray, rule_fired: np.ndarray, keep: float) -> float:
    """Lowest P(ungradable) cut that still leaves at least ``keep`` of Good/Usable images gradable.

    An image is ungradable when a hard rule fires or its probability reaches the cut, so the rules' share of
    refused good images is paid for first.
    """
    good = y == 0
    candidates = np.unique(np.concatenate([oof[good], [1.0 - 1e-9]]))
    for cut in candidates:  # ascending: the first cut that keeps enough is the most sensitive one
        refused = rule_fired[good] | (oof[good] >= cut)
        if 1.0 - refused.mean() >= keep:
            return float(min(max(cut, 1e-6), 1.0 - 1e-6))
    return 1.0 - 1e-6


# --------------------------------------------------------------------------------------------------------
# The whole fit
# --------------------------------------------------------------------------------------------------------


def build_params(
    samples: Sequence[MeasuredImage], keep: float = 0.95, meta: dict[str, Any] | None = None
) -> tuple[GateParams, dict[str, Any]]:
    """Fit every part of the gate on measured samples; returns the parameters and out-of-fold results."""
    fundus = [s for s in samples if s.dataset in FUNDUS_SETS]
    not_fundus_rules = fit_not_fundus_rules(fundus)
    ungradable_rules = fit_ungradable_rules(gradable_reference(fundus))

    labelled = eyeq_samples(samples)
    x = feature_matrix(labelled, MODEL_FEATURES)
    y = np.asarray([s.quality == "Reject" for s in labelled], dtype=int)
    groups = [s.patient for s in labelled]
    oof = grouped_oof(x, y, groups)
    fired = np.asarray([any(r.fires(s.features) for r in ungradable_rules) for s in labelled])
    threshold = choose_threshold(oof, y, fired, keep)
    final = fit_logistic(x, y)
    params = GateParams(
        features=MODEL_FEATURES,
        mean=tuple(_round(v) for v in final.mean),
        scale=tuple(_round(v) for v in final.scale),
        coef=tuple(_round(v) for v in final.coef),
        intercept=_round(final.intercept),
        threshold=_round(threshold),
        not_fundus_rules=not_fundus_rules,
        ungradable_rules=ungradable_rules,
        z_clip=Z_CLIP,
        meta=meta or {},
    )
    return params, {"labelled": labelled, "y": y, "oof": oof, "rule_fired": fired, "groups": groups}


def _verdict_oof(s: MeasuredImage, params: GateParams, p_ungradable: float) -> QualityAssessment:
    """The gate's decision on an EyeQ image, with its out-of-fold P(ungradable) for the final model's."""
    verdict = decide(s.features, params)
    if not verdict.is_fundus:
        return verdict
    fired = any(r.fires(s.features) for r in params.ungradable_rules)
    gradable = not fired and p_ungradable < params.threshold
    return QualityAssessment(True, gradable, 1.0 - p_ungradable, verdict.reasons)


def evaluate(
    samples: Sequence[MeasuredImage], params: GateParams, fit: dict[str, Any], n_boot: int = 1000
) -> dict[str, Any]:
    """Every number the report quotes."""
    y, oof, groups = fit["y"], fit["oof"], fit["groups"]
    auc, lo, hi = bootstrap_ci(roc_auc, y, oof, n_boot=n_boot, seed=SEED, groups=groups)
    verdicts = [_verdict_oof(s, params, p) for s, p in zip(fit["labelled"], oof, strict=True)]
    ungradable = np.asarray([not v.gradable for v in verdicts])
    reject = y == 1
    results: dict[str, Any] = {
        "eyeq": {
            "n": len(y),
            "n_reject": int(reject.sum()),
            "oof_auc": auc,
            "oof_auc_ci95": [lo, hi],
            "sensitivity_reject": float(ungradable[reject].mean()),
            "specificity_reject": float((~ungradable[~reject]).mean()),
            "good_usable_kept": float((~ungradable[~reject]).mean()),
            "rule_fired_good_usable": float(fit["rule_fired"][~reject].mean()),
            "rule_fired_reject": float(fit["rule_fired"][reject].mean()),
        }
    }
    # Transfer to camera colours: EyePACS-768 images with EyeQ labels, scored by the final EyeQ model, for
    # patients absent from the EyeQ folder (the two folders share some patients and photos).
    eyeq_patients = {s.patient for s in fit["labelled"]}
    external = [s for s in samples if s.dataset == "eyepacs-768" and s.quality and s.patient not in eyeq_patients]
    if external:
        ye = np.asarray([s.quality == "Reject" for s in external], dtype=int)
        pe = np.asarray([params.probability_ungradable(s.features) for s in external])
        ve = [decide(s.features, params) for s in external]
        ue = np.asarray([not v.gradable for v in ve])
        results["eyepacs_768_external"] = {
            "n": len(external),
            "n_reject": int(ye.sum()),
            "auc": roc_auc(ye, pe),
            "sensitivity_reject": float(ue[ye == 1].mean()) if ye.any() else math.nan,
            "specificity_reject": float((~ue[ye == 0]).mean()) if (ye == 0).any() else math.nan,
        }
    per_set = {}
    for name in (*FUNDUS_SETS, NON_FUNDUS_SET):
        members = [s for s in samples if s.dataset == name]
        verdicts_set = [(s, decide(s.features, params)) for s in members]
        entry: dict[str, Any] = {"n": len(members)}
        if name == NON_FUNDUS_SET:
            ood = [(s, v) for s, v in verdicts_set if "ood" in s.kind]
            inlier = [(s, v) for s, v in verdicts_set if "ood" not in s.kind]
            entry["ood_n"] = len(ood)
            entry["ood_flagged"] = sum(not v.is_fundus for _, v in ood)
            entry["ood_missed"] = [s.image for s, v in ood if v.is_fundus]
            entry["fundus_flagged"] = [s.image for s, v in inlier if not v.is_fundus]
            entry["detail"] = [(s.image, s.kind.split(" ")[0], list(v.reasons)) for s, v in verdicts_set]
        else:
            entry["not_fundus"] = sum(not v.is_fundus for _, v in verdicts_set)
            entry["not_fundus_images"] = [(s.image, list(v.reasons)) for s, v in verdicts_set if not v.is_fundus]
            entry["ungradable"] = sum(v.is_fundus and not v.gradable for _, v in verdicts_set)
            if name == "raw-fundus-samples":
                entry["detail"] = [(s.image, v.gradable, round(v.score, 3), list(v.reasons)) for s, v in verdicts_set]
        per_set[name] = entry
    results["sets"] = per_set
    return results


# --------------------------------------------------------------------------------------------------------
# Report and entry point
# --------------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f} %"


def render_report(params: GateParams, results: dict[str, Any], command: str, seconds: float) -> str:
    """docs/gate-report.md: every number below comes from ``results`` of one run of ``command``."""
    eyeq = results["eyeq"]
    lo, hi = eyeq["oof_auc_ci95"]
    lines = [
        "# Quality / not-a-fundus gate: measured results",
        "",
        "Produced by (from the repository root, data in `../shared/data`):",
        "",
        f"    {command}",
        "",
        f"Fit and evaluation took {seconds:.0f} s on 2 CPU cores (features cached under `cache/gate/`).",
        "Every image goes through the serving path: `decode_image(data, min_side=decode_min_side)`, `prepare()`",
        "with the shipped model's preprocessing (`PREPROCESS_CONFIG`), `compute_quality_features()`.",
        "Parameters: `models/gate.json`.",
        "",
        "## Gradability (EyeQ labels: Reject vs Good + Usable)",
        "",
        f"Logistic regression on {len(params.features)} relative features ({', '.join(params.features)}),",
        f"{N_FOLDS}-fold GroupKFold by `patient`, {eyeq['n']} images ({eyeq['n_reject']} Reject).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| out-of-fold ROC AUC (95 % CI, patient bootstrap, 1000 resamples) | {eyeq['oof_auc']:.3f} "
        f"({lo:.3f}-{hi:.3f}) |",
        f"| ungradable threshold on P(ungradable) | {params.threshold:.4g} |",
        f"| Good/Usable kept gradable (target >= 95 %) | {_pct(eyeq['good_usable_kept'])} |",
        f"| sensitivity for Reject (out of fold, rules + model) | {_pct(eyeq['sensitivity_reject'])} |",
        f"| specificity for Reject | {_pct(eyeq['specificity_reject'])} |",
        f"| hard rules firing on Good/Usable / on Reject | {_pct(eyeq['rule_fired_good_usable'])} / "
        f"{_pct(eyeq['rule_fired_reject'])} |",
        "",
    ]
    ext = results.get("eyepacs_768_external")
    if ext:
        lines += [
            "Transfer to camera colours: EyePACS-768 images that carry EyeQ labels, patients absent from the",
            "EyeQ folder, scored by the final model with the same threshold:",
            "",
            "| n (Reject) | ROC AUC | sensitivity | specificity |",
            "|---|---|---|---|",
            f"| {ext['n']} ({ext['n_reject']}) | {ext['auc']:.3f} | {_pct(ext['sensitivity_reject'])} | "
            f"{_pct(ext['specificity_reject'])} |",
            "",
        ]
    lines += [
        "Why these features: EyeQ images are cropped, 256 px, strongly contrast-equalised derivatives.",
        "Absolute levels (luminance, saturation, colour ratios) differ by up to 2x between an EyeQ image and",
        "the same photo in camera colours (46 photos are in both folders), so the model uses only ratios:",
        "fine-to-band detail (`sharpness`), Laplacian and band-pass energy relative to brightness, and",
        "coefficients of variation. Models that also used absolute luminance reached a higher EyeQ AUC but",
        "refused most APTOS and EyePACS-768 images (measured while developing the gate).",
        "",
        "## Hard rules",
        "",
        "| kind | feature | fires when | reason code |",
        "|---|---|---|---|",
    ]
    for kind, rules in (("not a fundus", params.not_fundus_rules), ("ungradable", params.ungradable_rules)):
        for rule in rules:
            cond = f"< {rule.min:.4g}" if rule.min is not None else f"> {rule.max:.4g}"
            lines.append(f"| {kind} | `{rule.feature}` | {cond} | `{rule.reason}` |")
    lines += [
        "",
        "Not-a-fundus thresholds are the minimum (maximum) of the feature over all "
        f"{sum(results['sets'][n]['n'] for n in FUNDUS_SETS)} fundus photographs",
        "(APTOS, EyePACS-768, EyeQ including Reject, raw samples) halved (doubled; x1.5 for",
        "`green_fraction`, see `NOT_FUNDUS_RULE_SPECS`). The non-fundus images were not used to set any",
        "threshold. Ungradable thresholds are the 0.1 / 99.9 percentiles over graded images (EyeQ and",
        "EyePACS-768 Good/Usable, APTOS); `detail_contrast` halved (camera JPEGs reduced to 224 px show less",
        "band contrast).",
        "",
        "## Decisions per data folder",
        "",
        "| folder | images | called not a fundus | ungradable |",
        "|---|---|---|---|",
    ]
    for name in FUNDUS_SETS:
        entry = results["sets"][name]
        lines.append(
            f"| {name} | {entry['n']} | {entry['not_fundus']} ({_pct(entry['not_fundus'] / entry['n'])}) | "
            f"{entry['ungradable']} ({_pct(entry['ungradable'] / entry['n'])}) |"
        )
    nf = results["sets"][NON_FUNDUS_SET]
    lines += [
        "",
        f"Non-fundus folder: {nf['ood_flagged']} of {nf['ood_n']} OOD images called not a fundus"
        f" (missed: {', '.join(nf['ood_missed']) or 'none'}); real fundus images there called not a fundus:"
        f" {', '.join(nf['fundus_flagged']) or 'none'}.",
        "",
        "| image | kind | reasons |",
        "|---|---|---|",
    ]
    for image, kind, reasons in nf["detail"]:
        lines.append(f"| {Path(image).name} | {kind} | {', '.join(reasons) or '(gradable fundus)'} |")
    lines += [
        "",
        "Raw camera JPEGs (`raw-fundus-samples`):",
        "",
        "| image | gradable | score | reasons |",
        "|---|---|---|---|",
    ]
    for image, gradable, score, reasons in results["sets"]["raw-fundus-samples"]["detail"]:
        lines.append(f"| {Path(image).name} | {'yes' if gradable else 'no'} | {score:.3f} | {', '.join(reasons)} |")
    lines += [
        "",
        "## Limits",
        "",
        "- APTOS images carry no quality label; its ungradable share is what the gate refuses among images",
        "  that graders did grade, i.e. a cost, not an error rate.",
        "- The EyeQ threshold is tuned on equalised images; on camera colours it is somewhat more permissive",
        "  (see the transfer table). Six raw camera JPEGs cannot measure accuracy at full resolution.",
        "- The not-a-fundus rules were checked on 17 OOD images only; the colour wheel is caught by",
        "  `green_fraction` alone with a thin margin.",
        "",
    ]
    return "\n".join(lines)


def fit_gate(
    data_root: Path,
    out: Path,
    report: Path | None,
    cache_dir: Path | None,
    keep: float = 0.95,
    n_boot: int = 1000,
    command: str = "python -m retinagrade.training.fit_gate",
    config: PreprocessConfig | None = None,
) -> dict[str, Any]:
    """Measure every image, fit the gate, write ``out`` (JSON) and ``report`` (Markdown).

    Returns:
        The evaluation results quoted in the report.
    """
    start = time.perf_counter()
    config = config or PreprocessConfig()
    samples = [s for name in (*FUNDUS_SETS, NON_FUNDUS_SET) for s in load_dataset(data_root, name, cache_dir, config)]
    meta = {
        "preprocess": config.to_dict(),
        "fitted_on": f"{EYEQ_SET} (EyeQ Reject vs Good+Usable); rules from {', '.join(FUNDUS_SETS)}",
        "split": f"GroupKFold({N_FOLDS}) by patient, seed {SEED}",
        "keep_good_usable": keep,
    }
    params, fit = build_params(samples, keep=keep, meta=meta)
    results = evaluate(samples, params, fit, n_boot=n_boot)
    params = GateParams.from_dict(
        {
            **params.to_dict(),
            "meta": {
                **meta,
                "eyeq_oof_auc": round(results["eyeq"]["oof_auc"], 4),
                "eyeq_oof_auc_ci95": [round(v, 4) for v in results["eyeq"]["oof_auc_ci95"]],
            },
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(params.to_dict(), indent=2) + "\n", encoding="utf-8")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        text = render_report(params, results, command, time.perf_counter() - start)
        report.write_text(text.replace("PREPROCESS_CONFIG", json.dumps(config.to_dict())), encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_root(), help="shared data folder")
    parser.add_argument("--out", type=Path, default=Path("models/gate.json"))
    parser.add_argument("--report", type=Path, default=Path("docs/gate-report.md"))
    parser.add_argument("--cache", type=Path, default=Path("cache/gate"), help="feature cache ('' to disable)")
    parser.add_argument("--keep", type=float, default=0.95, help="share of Good/Usable EyeQ images kept gradable")
    parser.add_argument(
        "--model-spec",
        type=Path,
        default=Path("models/retinagrade-dr.json"),
        help="model spec whose preprocessing the gate sees at serving time (default config if absent)",
    )
    args = parser.parse_args(argv)
    config = PreprocessConfig()
    if args.model_spec.is_file():
        config = PreprocessConfig.from_dict(json.loads(args.model_spec.read_text())["preprocess"])
    results = fit_gate(
        args.data,
        args.out,
        args.report,
        args.cache if str(args.cache) else None,
        keep=args.keep,
        command="python -m retinagrade.training.fit_gate" + (f" --keep {args.keep}" if args.keep != 0.95 else ""),
        config=config,
    )
    eyeq = results["eyeq"]
    print(
        f"EyeQ OOF AUC {eyeq['oof_auc']:.3f} ({eyeq['oof_auc_ci95'][0]:.3f}-{eyeq['oof_auc_ci95'][1]:.3f}); "
        f"Reject sensitivity {eyeq['sensitivity_reject']:.3f}, specificity {eyeq['specificity_reject']:.3f}; "
        f"wrote {args.out}" + (f" and {args.report}" if args.report else "")
    )


if __name__ == "__main__":
    main()
