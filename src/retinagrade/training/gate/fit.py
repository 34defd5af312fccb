"""Fit every part of the gate: not-a-fundus rules, the detector head, the resolution calibration, gradability.

* **Rules** (cheap, explainable pre-checks): each threshold is the minimum (maximum) of one feature over every
  fundus photograph here, halved (doubled), so a rule fires only far outside every real fundus photo. The
  negatives never set a rule.
* **Detector head**: a logistic regression on the frozen backbone's features of every view (see
  :mod:`.measure`), weighted so that each negative *kind* weighs the same (132 angiograms from one source are
  one kind) and each fundus folder weighs the same. Its threshold is chosen out of fold (5 folds by patient):
  the highest that calls at most :data:`MAX_FUNDUS_REFUSED` of any fundus folder "not a fundus". How a fundus
  source never seen in training fares is validated separately (leave-one-fundus-source-out, in the report).
* **Resolution calibration**: the same EyePACS camera photos measured at their resolution and as APTOS-like
  224 px derivatives give each gradability feature's drift with the field-of-view diameter; it is removed
  before the gradability model, so a small photo is judged as if it had been taken at camera resolution.
* **Gradability**: logistic regression for P(ungradable) on EyeQ labels (Reject vs Good + Usable) plus the
  EyePACS-768 photos that carry EyeQ labels, at camera resolution and as 224 px derivatives, plus every photo
  of the DR-graded folders as a gradable example (graders graded them); out of fold by patient across the
  EyePACS folders. The threshold keeps :data:`KEEP_GRADABLE` of the EyeQ-labelled Good/Usable photos.
* **Referable override**: a photo the gradability score refused is graded, with a warning, when the grading
  model's calibrated P(referable) reaches :data:`OVERRIDE_MIN_P_REFERABLE` (a clinical cut-off, not fitted:
  see :class:`~retinagrade.preprocessing.quality.ReferableOverride`); its effect per true grade is in the report.

scikit-learn is used here only; serving reads the JSON with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.files import sha256_file
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
    ReferableOverride,
    ResolutionCalibration,
    Rule,
    decide,
)
from retinagrade.preprocessing.quality_detector import DetectorParams
from retinagrade.preprocessing.quality_features import FEATURE_NAMES
from retinagrade.training.gate.measure import (
    CAMERA_SET,
    DETECTOR_SIDE,
    EYEQ_SET,
    FUNDUS_SETS,
    MeasuredSet,
)

#: Features the gradability model uses: relative measures that survive EyeQ's equalisation and cropping.
MODEL_FEATURES: tuple[str, ...] = ("sharpness", "laplacian_rel", "lum_cv", "detail_contrast", "illumination_cv")
N_FOLDS = 5
SEED = 0
Z_CLIP = 5.0
#: Share of Good/Usable images (out of fold) the gradability threshold keeps gradable.
KEEP_GRADABLE = 0.97
#: The detector threshold may call at most this share of any unseen fundus folder "not a fundus".
MAX_FUNDUS_REFUSED = 0.003
#: ... and at most this share of all its photos (readable or not): the target for every fundus source.
MAX_FUNDUS_REFUSED_ALL = 0.005
#: L2 strength of the detector head (inverse); small: ~2000 features, a few hundred negatives per kind.
DETECTOR_C = 0.01
#: Fundus views per folder used to fit the detector head (the folders are weighted equally anyway).
POSITIVE_VIEWS_PER_SET = 1500
DETECTOR_FILE = "fundus-detector.onnx"
#: DR-graded folders without a quality label: every photo in them was graded, so it is a gradable example.
GRADED_SETS: tuple[str, ...] = ("aptos2019-224", "mexico-512", "eyepacs-256-graded")
#: Calibrated P(referable) at which the grading model's answer outranks the gradability score's refusal: far
#: above any operating point (0.09 shipped), so that only plain disease does. On the development data no photo
#: of grade 0-1 the score refused reached it, and 5 of the 5 proliferative EyePACS camera photos it refused did.
OVERRIDE_MIN_P_REFERABLE = 0.9
#: Domains of the gradability data that carry EyeQ quality labels (the threshold is chosen on these).
LABELLED_DOMAINS: tuple[str, ...] = ("eyeq", "camera", "camera-224")


def _round(value: float) -> float:
    return float(f"{value:.4g}")


# --------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSpec:
    """``threshold = factor x percentile(feature, pct)`` over the reference photos, on one side."""

    feature: str
    reason: str
    side: str  # "min" or "max"
    pct: float
    factor: float


NOT_FUNDUS_RULE_SPECS: tuple[RuleSpec, ...] = (
    RuleSpec("found", REASON_FUNDUS_NOT_FOUND, "min", 0.0, 0.5),
    RuleSpec("image_fraction", REASON_FOV_TOO_SMALL, "min", 0.0, 0.5),
    RuleSpec("min_side", REASON_TOO_SMALL, "min", 0.0, 0.5),
    # Grayscale: fluorescein angiograms, OCT, red-free photos are not what the grader was trained on.
    RuleSpec("chroma", REASON_GRAYSCALE, "min", 0.0, 0.5),
    RuleSpec("corner_dark_fraction", REASON_NO_DARK_SURROUND, "min", 0.0, 0.5),
    # 1.5 rather than 2: the greenest fundus images are EyeQ's equalised ones.
    RuleSpec("green_fraction", REASON_NOT_FUNDUS_COLOUR, "max", 100.0, 1.5),
)

#: Hard ungradable rules fire only beyond the 0.1 % tail of photos graders did grade (every graded folder).
UNGRADABLE_RULE_SPECS: tuple[RuleSpec, ...] = (
    RuleSpec("lum_p50", REASON_TOO_DARK, "min", 0.1, 1.0),
    RuleSpec("saturated_fraction", REASON_OVEREXPOSED, "max", 99.9, 1.0),
    RuleSpec("sharpness", REASON_BLURRED, "min", 0.1, 1.0),
    RuleSpec("detail_contrast", REASON_LOW_CONTRAST, "min", 0.1, 0.5),
    RuleSpec("visible_fraction", REASON_CUT_OFF, "min", 0.1, 1.0),
)


def fit_rules(specs: Sequence[RuleSpec], quality: np.ndarray) -> tuple[Rule, ...]:
    """Thresholds from the distribution of each feature over ``quality`` (N x len(FEATURE_NAMES))."""
    rules = []
    for spec in specs:
        values = quality[:, FEATURE_NAMES.index(spec.feature)]
        threshold = _round(spec.factor * float(np.percentile(values, spec.pct)))
        rules.append(
            Rule(spec.feature, spec.reason, min=threshold)
            if spec.side == "min"
            else Rule(spec.feature, spec.reason, max=threshold)
        )
    return tuple(rules)


def rules_fire(rules: Sequence[Rule], quality: np.ndarray) -> np.ndarray:
    """N booleans: does any rule fire on each row of ``quality``."""
    return np.asarray([any(r.fires(dict(zip(FEATURE_NAMES, q, strict=True))) for r in rules) for q in quality])


# --------------------------------------------------------------------------------------------------------
# Detector head
# --------------------------------------------------------------------------------------------------------


@dataclass
class DetectorData:
    """Every detector view of every folder, with what the validation groups by."""

    x: np.ndarray  # V x D backbone features
    y: np.ndarray  # V labels: 1 fundus photo, 0 not
    dataset: np.ndarray
    kind: np.ndarray
    source: np.ndarray
    aug: np.ndarray  # 0 = the image as sent
    image: np.ndarray  # index into ``rows`` of the view's image
    rows: list[tuple[str, int]]  # (dataset, record index) per image


def detector_data(sets: dict[str, MeasuredSet]) -> DetectorData:
    xs, ys, dss, kinds, sources, augs, images = [], [], [], [], [], [], []
    rows: list[tuple[str, int]] = []
    for name, s in sets.items():
        offset = len(rows)
        rows.extend((name, i) for i in range(len(s.records)))
        labels = np.asarray([r.label for r in s.records])
        keep = labels[s.view_image] >= 0
        xs.append(s.detector[keep])
        ys.append(labels[s.view_image][keep])
        dss.append(np.full(int(keep.sum()), name, dtype=object))
        kinds.append(np.asarray([s.records[i].kind for i in s.view_image[keep]], dtype=object))
        sources.append(np.asarray([s.records[i].source for i in s.view_image[keep]], dtype=object))
        augs.append(s.view_aug[keep])
        images.append(s.view_image[keep] + offset)
    return DetectorData(
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys).astype(int),
        np.concatenate(dss),
        np.concatenate(kinds),
        np.concatenate(sources),
        np.concatenate(augs),
        np.concatenate(images),
        rows,
    )


def detector_weights(data: DetectorData, mask: np.ndarray) -> np.ndarray:
    """Each negative kind weighs the same, each fundus folder weighs the same, both classes half."""
    w = np.zeros(len(data.y))
    for label, key in ((0, data.kind), (1, data.dataset)):
        members = mask & (data.y == label)
        groups = np.unique(key[members])
        for g in groups:
            m = members & (key == g)
            w[m] = 1.0 / (m.sum() * len(groups))
    return np.asarray(w * (mask.sum() / 2.0))


def _subsample_positives(data: DetectorData, mask: np.ndarray) -> np.ndarray:
    """At most :data:`POSITIVE_VIEWS_PER_SET` fundus views per folder (fit time; weights equalise anyway)."""
    rng = np.random.default_rng(SEED)
    out = mask.copy()
    for name in np.unique(data.dataset[mask & (data.y == 1)]):
        idx = np.flatnonzero(mask & (data.y == 1) & (data.dataset == name))
        if len(idx) > POSITIVE_VIEWS_PER_SET:
            out[rng.choice(idx, len(idx) - POSITIVE_VIEWS_PER_SET, replace=False)] = False
    return out


@dataclass(frozen=True)
class LinearHead:
    """A standardised linear model, as plain numbers."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(((x - self.mean) / self.scale) @ self.coef + self.intercept)


def fit_detector_head(data: DetectorData, mask: np.ndarray, c: float = DETECTOR_C) -> LinearHead:
    """Logistic regression P(fundus photo) on the views selected by ``mask``."""
    from sklearn.linear_model import LogisticRegression

    train = _subsample_positives(data, mask)
    x = data.x[train].astype(np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    model = LogisticRegression(C=c, max_iter=1000)
    model.fit((x - mean) / scale, data.y[train], sample_weight=detector_weights(data, train)[train])
    return LinearHead(mean, scale, model.coef_[0].copy(), float(model.intercept_[0]))


def held_out_logits(
    data: DetectorData, groups: dict[str, np.ndarray], progress: Callable[[str], None] | None = None
) -> dict[str, np.ndarray]:
    """For each named group of views: their logits from a head that never saw any view of the group.

    Groups holding exactly the same views share one fit (a source that is one kind is fitted once).
    """
    out: dict[str, np.ndarray] = {}
    done: dict[bytes, np.ndarray] = {}
    for name, mask in groups.items():
        key = np.packbits(mask).tobytes()
        if key not in done:
            if progress is not None:
                progress(f"detector held out: {name}")
            head = fit_detector_head(data, ~mask)
            done[key] = head.logit(data.x[mask].astype(np.float64))
        out[name] = done[key]
    return out


def fundus_source_groups(data: DetectorData) -> dict[str, np.ndarray]:
    """Leave-one-fundus-source-out groups: folders sharing patients and processing are held out together."""
    groups: dict[str, np.ndarray] = {}
    for dataset, group in FUNDUS_SETS.items():
        groups.setdefault(group, np.zeros(len(data.y), bool))
        groups[group] |= data.dataset == dataset
    groups["scikit-image retina.jpg"] = (data.y == 1) & (data.dataset == "non-fundus")
    return {k: v for k, v in groups.items() if v.any()}


def patient_fold_logits(
    data: DetectorData, sets: dict[str, MeasuredSet], progress: Callable[[str], None] | None = None
) -> np.ndarray:
    """Out-of-fold logits of every fundus view: 5 folds by patient (EyePACS patients across folders).

    Each fold's head sees every negative and the other folds' fundus photos, so a photo is scored by a head
    that never saw it, its other views or its patient's other eye. NaN for negatives.
    """
    from sklearn.model_selection import GroupKFold

    patient = np.asarray(
        [
            _eyepacs_patient(sets[d].records[i].patient) if d.startswith("eyepacs") else sets[d].records[i].patient
            for d, i in (data.rows[int(k)] for k in data.image)
        ]
    )
    out = np.full(len(data.y), np.nan)
    positives = np.flatnonzero(data.y == 1)
    splitter = GroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=SEED)
    for fold, (_, test) in enumerate(splitter.split(positives, groups=patient[positives])):
        if progress is not None:
            progress(f"detector: patient fold {fold + 1} of {N_FOLDS}")
        held = np.zeros(len(data.y), bool)
        held[positives[test]] = True
        out[held] = fit_detector_head(data, ~held).logit(data.x[held].astype(np.float64))
    return out


def choose_detector_threshold(
    logits: np.ndarray,
    data: DetectorData,
    max_refused: float,
    otherwise_graded: np.ndarray | None = None,
    max_refused_all: float = MAX_FUNDUS_REFUSED_ALL,
) -> float:
    """Highest P threshold that refuses few fundus photos as "not a fundus" in every fundus folder.

    ``logits`` are out-of-fold logits of every fundus view (NaN for negatives); only the images as sent (not
    augmented views) count. Per folder, at most ``max_refused`` of the photos the rest of the gate would grade
    (``otherwise_graded``; all photos when None) and at most ``max_refused_all`` of all photos may fall below
    it: a black, unreadable frame called "not a fundus" instead of "ungradable" recalls no extra patient, a
    readable photo refused does. Folders with fewer than 100 images cannot resolve such rates and are skipped.
    """
    sent = (data.aug == 0) & (data.y == 1)
    graded = otherwise_graded if otherwise_graded is not None else np.ones(len(data.y), bool)
    for cut in np.linspace(4.0, -6.0, 201):  # descending: the first cut that passes refuses the most negatives
        ok = True
        for name in np.unique(data.dataset[sent]):
            m = sent & (data.dataset == name)
            if m.sum() < 100:
                continue
            below = logits < cut
            if float(below[m].mean()) > max_refused_all or float(below[m & graded].mean()) > max_refused:
                ok = False
                break
        if ok:
            return float(1.0 / (1.0 + math.exp(-cut)))
    return float(1.0 / (1.0 + math.exp(6.0)))


# --------------------------------------------------------------------------------------------------------
# Gradability
# --------------------------------------------------------------------------------------------------------


def fit_calibration(camera: MeasuredSet) -> ResolutionCalibration:
    """Drift of each gradability feature between camera resolution and the 224 px derivative of the same photos.

    Knots at the median field-of-view diameters of the two versions; the offset is 0 at camera resolution.
    """
    native = camera.quality[camera.small_index]
    small = camera.quality_224
    d = FEATURE_NAMES.index("fundus_diameter")
    diameters = (_round(float(np.median(small[:, d]))), _round(float(np.median(native[:, d]))))
    offsets: dict[str, tuple[float, ...]] = {}
    for name in MODEL_FEATURES:
        j = FEATURE_NAMES.index(name)
        offsets[name] = (_round(float(np.median(small[:, j] - native[:, j]))), 0.0)
    return ResolutionCalibration(diameters=diameters, offsets=offsets)


def _calibrated_matrix(quality: np.ndarray, calibration: ResolutionCalibration) -> np.ndarray:
    d = quality[:, FEATURE_NAMES.index("fundus_diameter")]
    cols = []
    for name in MODEL_FEATURES:
        j = FEATURE_NAMES.index(name)
        cols.append(quality[:, j] - np.asarray([calibration.offset(name, float(v)) for v in d]))
    return np.stack(cols, axis=1)


@dataclass
class GradabilityData:
    """Labelled fundus photos for the gradability model."""

    x: np.ndarray  # N x len(MODEL_FEATURES), calibrated
    raw: np.ndarray  # N x len(FEATURE_NAMES)
    y: np.ndarray  # 1 = Reject
    group: np.ndarray  # EyePACS patient (shared across the EyePACS folders)
    domain: np.ndarray  # "eyeq", "camera", "camera-224"


def _eyepacs_patient(patient: str) -> str:
    return "eyepacs:" + patient.split(":", 1)[1]


def gradability_data(sets: dict[str, MeasuredSet], calibration: ResolutionCalibration) -> GradabilityData:
    raws, ys, groups, domains = [], [], [], []
    eyeq = sets[EYEQ_SET]
    for i, r in enumerate(eyeq.records):
        if r.quality in ("Good", "Usable", "Reject"):
            raws.append(eyeq.quality[i])
            ys.append(int(r.quality == "Reject"))
            groups.append(_eyepacs_patient(r.patient))
            domains.append("eyeq")
    camera = sets.get(CAMERA_SET)
    if camera is not None:
        small_row = {int(i): k for k, i in enumerate(camera.small_index)}
        for i, r in enumerate(camera.records):
            if r.quality not in ("Good", "Usable", "Reject"):
                continue
            versions = [("camera", camera.quality[i])]
            if i in small_row:
                versions.append(("camera-224", camera.quality_224[small_row[i]]))
            for domain, q in versions:
                raws.append(q)
                ys.append(int(r.quality == "Reject"))
                groups.append(_eyepacs_patient(r.patient))
                domains.append(domain)
    # Photos graders graded for DR are gradable by definition: camera colours, pathology (laser scars,
    # haemorrhages) and 224-512 px resolutions the EyeQ derivatives lack. They teach the model that strong
    # contrast from disease is not poor quality; the threshold is still set on EyeQ-labelled photos only.
    for name in GRADED_SETS:
        graded = sets.get(name)
        if graded is None:
            continue
        for i, r in enumerate(graded.records):
            raws.append(graded.quality[i])
            ys.append(0)
            groups.append(_eyepacs_patient(r.patient) if name.startswith("eyepacs") else r.patient)
            domains.append(name)
    raw = np.asarray(raws, np.float64)
    return GradabilityData(
        _calibrated_matrix(raw, calibration), raw, np.asarray(ys), np.asarray(groups), np.asarray(domains)
    )


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> LinearHead:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.clip((x - mean) / scale, -Z_CLIP, Z_CLIP)
    model = LogisticRegression(C=c, max_iter=2000).fit(z, y)
    return LinearHead(mean, scale, model.coef_[0].copy(), float(model.intercept_[0]))


def p_ungradable(head: LinearHead, x: np.ndarray) -> np.ndarray:
    z = np.clip((x - head.mean) / head.scale, -Z_CLIP, Z_CLIP)
    return np.asarray(1.0 / (1.0 + np.exp(-(z @ head.coef + head.intercept))))


def gradability_oof(data: GradabilityData) -> np.ndarray:
    """Out-of-fold P(ungradable): each photo scored by a model that never saw its patient (any folder)."""
    from sklearn.model_selection import GroupKFold

    oof = np.full(len(data.y), np.nan)
    splitter = GroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=SEED)
    for train, test in splitter.split(data.x, data.y, groups=data.group):
        oof[test] = p_ungradable(fit_logistic(data.x[train], data.y[train]), data.x[test])
    return oof


def choose_gradability_threshold(oof: np.ndarray, y: np.ndarray, rule_fired: np.ndarray, keep: float) -> float:
    """Lowest P(ungradable) cut that leaves at least ``keep`` of Good/Usable photos gradable (rules included)."""
    good = y == 0
    for cut in np.unique(np.concatenate([oof[good], [1.0 - 1e-6]])):
        refused = rule_fired[good] | (oof[good] >= cut)
        if 1.0 - refused.mean() >= keep:
            return float(min(max(cut, 1e-6), 1.0 - 1e-6))
    return 1.0 - 1e-6


def graded_reference(sets: dict[str, MeasuredSet]) -> np.ndarray:
    """Quality features of photos graders graded: every DR-graded folder, EyeQ/EyePACS only Good or Usable."""
    rows = []
    for name, s in sets.items():
        if name not in FUNDUS_SETS:
            continue
        for i, r in enumerate(s.records):
            if r.quality in ("Good", "Usable") or (not r.quality and name != "raw-fundus-samples"):
                rows.append(s.quality[i])
    return np.asarray(rows)


# --------------------------------------------------------------------------------------------------------
# The whole fit
# --------------------------------------------------------------------------------------------------------


@dataclass
class FittedGate:
    """The fitted gate and everything the report needs."""

    params: GateParams
    sets: dict[str, MeasuredSet]
    detector: DetectorData
    grad: GradabilityData
    grad_oof: np.ndarray
    grad_rule_fired: np.ndarray
    lofso_logits: np.ndarray  # leave-one-fundus-source-out logits of every fundus view (NaN elsewhere)
    #: The grading model's P(referable) of every photo the gradability score refuses, by (folder, record):
    #: what the referable override needs (empty: not measured, the override is left out of the report).
    p_referable: dict[tuple[str, int], float] = field(default_factory=dict)


def score_refused(fitted: FittedGate) -> list[tuple[str, int]]:
    """Every image (any folder) the gradability score alone refuses: those the model reads for the override.

    The quality verdict does not depend on the detector, so these are the same whichever head scores the
    image (final, leave-one-out): every table of the report needs no other image's P(referable).
    """
    out = []
    for name, s in fitted.sets.items():
        for i, row in enumerate(s.quality):
            if decide(dict(zip(FEATURE_NAMES, row, strict=True)), fitted.params, 1.0).model_may_outrank:
                out.append((name, i))
    return out


def read_p_referable(
    fitted: FittedGate,
    data_root: Path,
    spec: Path,
    images: Sequence[tuple[str, int]],
    progress: Callable[[str], None] | None = None,
) -> dict[tuple[str, int], float]:
    """The grading model's calibrated P(referable) of ``images``, as the pipeline computes it for a graded photo.

    The same decode, crop and model call (:class:`~retinagrade.pipeline.GradingPipeline`, batches of its
    default size), read whatever the gate says, so that any table of the report can apply the override.
    """
    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.inference.postprocess import decide_grade
    from retinagrade.pipeline import DEFAULT_BATCH_SIZE, GradingPipeline
    from retinagrade.preprocessing.pipeline import batch_tensor

    # The gate files are being replaced (their checksums in the spec are rewritten after the fit): check the
    # model file only.
    model = ModelSpec.load(spec, verify_checksum=False)
    if sha256_file(model.model_path) != model.sha256:
        raise ValueError(f"model file {model.model_path} does not match the sha256 in {spec.name}")
    pipeline = GradingPipeline(model, fitted.params)
    if progress is not None:
        progress(f"grading model on {len(images)} photos the gradability score refuses")
    out: dict[tuple[str, int], float] = {}
    for start in range(0, len(images), DEFAULT_BATCH_SIZE):
        chunk = images[start : start + DEFAULT_BATCH_SIZE]
        prepared = [
            pipeline.prepare((data_root / name / fitted.sets[name].records[i].image).read_bytes()).prepared
            for name, i in chunk
        ]
        outputs = pipeline.grader.run(batch_tensor([p.model_image for p in prepared], model.preprocess))
        for k, key in enumerate(chunk):
            out[key] = decide_grade(outputs.logits[k], float(outputs.regression[k]), model).p_referable
    return out


def fit(
    sets: dict[str, MeasuredSet],
    detector_file: Path,
    keep: float = KEEP_GRADABLE,
    meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> FittedGate:
    fundus_quality = np.concatenate([s.quality for name, s in sets.items() if name in FUNDUS_SETS])
    not_fundus_rules = fit_rules(NOT_FUNDUS_RULE_SPECS, fundus_quality)
    ungradable_rules = fit_rules(UNGRADABLE_RULE_SPECS, graded_reference(sets))

    data = detector_data(sets)
    lofso = np.full(len(data.y), np.nan)
    for name, logits in held_out_logits(data, fundus_source_groups(data), progress).items():
        lofso[fundus_source_groups(data)[name]] = logits
    fold_logits = patient_fold_logits(data, sets, progress)
    if progress is not None:
        progress("detector: final fit")
    head = fit_detector_head(data, np.ones(len(data.y), bool))
    detector = DetectorParams(
        file=detector_file.name,
        sha256=sha256_file(detector_file),
        input_side=DETECTOR_SIDE,
        mean=tuple(float(v) for v in head.mean),
        scale=tuple(float(v) for v in head.scale),
        coef=tuple(float(v) for v in head.coef),
        intercept=float(head.intercept),
        threshold=0.5,  # chosen below, once the rest of the gate is fitted
    )

    calibration = fit_calibration(sets[CAMERA_SET])
    grad = gradability_data(sets, calibration)
    oof = gradability_oof(grad)
    fired = rules_fire(ungradable_rules, grad.raw)
    labelled = np.isin(grad.domain, LABELLED_DOMAINS)
    cut = choose_gradability_threshold(oof[labelled], grad.y[labelled], fired[labelled], keep)
    final = fit_logistic(grad.x, grad.y)
    params = GateParams(
        features=MODEL_FEATURES,
        mean=tuple(_round(v) for v in final.mean),
        scale=tuple(_round(v) for v in final.scale),
        coef=tuple(_round(v) for v in final.coef),
        intercept=_round(final.intercept),
        threshold=min(max(_round(cut), 1e-4), 1.0 - 1e-4),
        not_fundus_rules=not_fundus_rules,
        ungradable_rules=ungradable_rules,
        z_clip=Z_CLIP,
        detector=None,
        calibration=calibration,
        referable_override=ReferableOverride(OVERRIDE_MIN_P_REFERABLE),
        meta=meta or {},
        base_dir=detector_file.parent,
    )
    # Which fundus photos the rest of the gate (rules, gradability) would grade: the detector's budget.
    graded_image = np.zeros(len(data.rows), bool)
    for k, (name, i) in enumerate(data.rows):
        if sets[name].records[i].label == 1:
            verdict = decide(dict(zip(FEATURE_NAMES, sets[name].quality[i], strict=True)), params)
            graded_image[k] = verdict.is_fundus and verdict.gradable
    threshold = choose_detector_threshold(fold_logits, data, MAX_FUNDUS_REFUSED, graded_image[data.image])
    detector = replace(detector, threshold=min(max(_round(threshold), 1e-4), 1.0 - 1e-4))
    params = replace(params, detector=detector)
    return FittedGate(params, sets, data, grad, oof, fired, lofso)
