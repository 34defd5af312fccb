"""Does the other eye help? Fellow-eye fusion measured on held-out predictions.

Reads a predictions CSV written by ``retinagrade train`` (``loso_predictions.csv``: every image predicted by a
model that never saw its source) or by ``benchmarks/shipped_on_sources.py``, pairs each image with the other
eye of the same patient (the ``group`` column and the file name's eye, :func:`retinagrade.eyes.eye_from_name`)
and scores :func:`retinagrade.eyes.fuse_logits` for a grid of weights:

- per image: referable AUC, own logits against fused (images without a graded fellow keep their own answer);
- per patient (both eyes present): AUC of "either eye referable" from the larger of the two eyes' P(referable),
  which is the decision the batch endpoint and ``grade --pair-eyes`` make;
- the weight chosen leave-one-source-out (the best mean image-level AUC on the other sources) and its result on
  the source left out, with a patient-grouped bootstrap interval of the gain.

Coarse labels (Mexico) are set per patient, so both eyes share one label there: a fellow-eye gain on such a
source overstates what fusion does for eyes graded one by one; the report says so.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinagrade.constants import NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.eyes import eye_from_name, fellow, fuse_logits
from retinagrade.referral import Eye
from retinagrade.training.decisions import travelling_operating_point
from retinagrade.training.metrics import _auc_or_nan, bootstrap_ci, softmax

if TYPE_CHECKING:
    from retinagrade.inference.model_spec import ModelSpec

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
PER_PATIENT_LABEL_SOURCES = frozenset({"mexico-512"})


class Paired:
    """Held-out predictions with each image's fellow-eye images."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.images = [r["image"] for r in rows]
        self.sources = np.array([r["source"] for r in rows])
        self.groups = np.array([r["group"] for r in rows])
        self.logits = np.array([[float(r[f"logit{k}"]) for k in range(NUM_GRADES)] for r in rows])
        low = np.array([int(r["grade_low"]) for r in rows])
        high = np.array([int(r["grade_high"]) for r in rows])
        # 1 referable, 0 not, -1 unknown (a grade range across the referable line).
        self.truth = np.where(low >= REFERABLE_MIN_GRADE, 1, np.where(high < REFERABLE_MIN_GRADE, 0, -1))
        self.eyes: list[tuple[str, Eye] | None] = []
        by_eye: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for i, image in enumerate(self.images):
            named = eye_from_name(Path(image).stem)
            key = None if named is None else (str(self.groups[i]), named[1])
            self.eyes.append(key)
            if key is not None:
                by_eye[(str(self.sources[i]), *key)].append(i)
        self.fellows: list[np.ndarray] = []
        for i, key in enumerate(self.eyes):
            other = [] if key is None else by_eye.get((str(self.sources[i]), key[0], fellow(key[1])), [])
            self.fellows.append(np.array(other, dtype=np.int64))

    @classmethod
    def read(cls, path: Path) -> Paired:
        with path.open(newline="") as fh:
            return cls(list(csv.DictReader(fh)))

    def p_referable(self, weight: float, temperature: float) -> np.ndarray:
        fused = np.stack([fuse_logits(self.logits[i], self.logits[f], weight) for i, f in enumerate(self.fellows)])
        return np.asarray(softmax(fused, temperature)[:, REFERABLE_MIN_GRADE:].sum(axis=1))

    def patients(self, source: str) -> dict[str, list[int]]:
        """Patients of ``source`` with both eyes present and every image's referable status known."""
        found: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, key in enumerate(self.eyes):
            if key is not None and self.sources[i] == source:
                found[key[0]][key[1]].append(i)
        return {
            patient: [i for eye in eyes.values() for i in eye]
            for patient, eyes in found.items()
            if len(eyes) == 2 and all(self.truth[i] >= 0 for eye in eyes.values() for i in eye)
        }


def _image_auc(paired: Paired, idx: np.ndarray, p: np.ndarray) -> float:
    known = idx[paired.truth[idx] >= 0]
    return _auc_or_nan(paired.truth[known] == 1, p[known])


def _patient_scores(paired: Paired, patients: dict[str, list[int]], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.array([paired.truth[v].max() == 1 for v in patients.values()])
    score = np.array([p[v].max() for v in patients.values()])
    return truth, score


def measure(
    paired: Paired, temperature: float, weights: tuple[float, ...] = WEIGHTS, n_boot: int = 1000
) -> dict[str, Any]:
    """Image- and patient-level AUC per source and weight; the weight chosen leave-one-source-out."""
    sources = sorted(set(paired.sources.tolist()))
    scores = {w: paired.p_referable(w, temperature) for w in weights}
    grid: dict[str, dict[str, Any]] = {}
    for source in sources:
        idx = np.flatnonzero(paired.sources == source)
        patients = paired.patients(source)
        rows = {}
        for w in weights:
            row: dict[str, Any] = {"image_auc": _image_auc(paired, idx, scores[w])}
            if patients:
                row["patient_auc"] = _auc_or_nan(*_patient_scores(paired, patients, scores[w]))
            rows[f"{w:.1f}"] = row
        grid[source] = {
            "images": len(idx),
            "with_fellow": int(sum(len(paired.fellows[i]) > 0 for i in idx)),
            "patients_both_eyes": len(patients),
            "label_per_patient": source in PER_PATIENT_LABEL_SOURCES,
            "by_weight": rows,
        }
    chosen: dict[str, Any] = {}
    for source in sources:
        others = [s for s in sources if s != source and s not in PER_PATIENT_LABEL_SOURCES] or [
            s for s in sources if s != source
        ]
        if not others:
            continue
        w = max(weights, key=lambda v: np.nanmean([grid[s]["by_weight"][f"{v:.1f}"]["image_auc"] for s in others]))
        idx = np.flatnonzero((paired.sources == source) & (paired.truth >= 0))
        own, fused = scores[0.0][idx], scores[w][idx]
        truth = paired.truth[idx] == 1
        gain = bootstrap_ci(
            lambda t, a, b: _auc_or_nan(t, b) - _auc_or_nan(t, a),
            truth,
            own,
            fused,
            n_boot=n_boot,
            groups=paired.groups[idx],
        )
        chosen[source] = {
            "weight": w,
            "chosen_on": others,
            "image_auc_own": _auc_or_nan(truth, own),
            "image_auc_fused": _auc_or_nan(truth, fused),
            "image_auc_gain": {"value": gain[0], "ci_low": gain[1], "ci_high": gain[2]},
        }
        patients = paired.patients(source)
        if patients:
            t_own, s_own = _patient_scores(paired, patients, scores[0.0])
            _, s_fused = _patient_scores(paired, patients, scores[w])
            chosen[source]["patient_auc_own"] = _auc_or_nan(t_own, s_own)
            chosen[source]["patient_auc_fused"] = _auc_or_nan(t_own, s_fused)
    return {"temperature": temperature, "weights": list(weights), "sources": grid, "leave_one_source_out": chosen}


def format_markdown(report: dict[str, Any]) -> str:
    def f(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"

    lines = [
        "# Fellow-eye fusion on held-out predictions",
        "",
        "Fused logits = (1 - w) x own + w x mean(fellow eye's images); w chosen on the other sources (leave one "
        "source out). Image AUC: referable, every image (no fellow: own answer). Patient AUC: either eye "
        "referable, from the larger P(referable) of a patient's images, patients with both eyes.",
        "",
        "| source | w | image AUC own | image AUC fused | gain (95% CI, patient bootstrap) | patient AUC own | "
        "patient AUC fused |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, row in report["leave_one_source_out"].items():
        gain = row["image_auc_gain"]
        note = " (label per patient)" if report["sources"][source]["label_per_patient"] else ""
        lines.append(
            f"| {source}{note} | {row['weight']:.1f} | {f(row['image_auc_own'])} | {f(row['image_auc_fused'])} | "
            f"{gain['value']:+.3f} ({gain['ci_low']:+.3f} to {gain['ci_high']:+.3f}) | "
            f"{f(row.get('patient_auc_own'))} | {f(row.get('patient_auc_fused'))} |"
        )
    lines += [
        "",
        "Image AUC by weight:",
        "",
        "| source | " + " | ".join(f"w={w:.1f}" for w in report["weights"]) + " |",
    ]
    lines.append("|---|" + "---|" * len(report["weights"]))
    for source, grid in report["sources"].items():
        cells = [f(grid["by_weight"][f"{w:.1f}"]["image_auc"]) for w in report["weights"]]
        lines.append(
            f"| {source} ({grid['with_fellow']}/{grid['images']} with a fellow eye) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """``fellow_eye.json`` and ``fellow_eye.md`` of a :func:`measure` report, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fellow_eye.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "fellow_eye.md").write_text(format_markdown(report))


def run(predictions: Path, temperature: float, out_dir: Path | None = None) -> dict[str, Any]:
    report = measure(Paired.read(predictions), temperature)
    report["predictions"] = str(predictions)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def choose_rule(
    paired: Paired, temperature: float, calibration_sources: list[str], min_sensitivity: float
) -> dict[str, Any] | None:
    """The fellow-eye rule a model ships with, or None when fusion does not raise held-out AUC.

    ``calibration_sources`` are narrowed to those in the predictions (all of them when none is), as the
    single-image decision narrows them to the held-out sources. The weight is the one with the best mean
    image-level AUC over those with fellow eyes and per-eye labels (sources labelled per patient only when
    there is no other); the fused operating point is chosen like the single-image one
    (:func:`~retinagrade.training.decisions.travelling_operating_point`).
    """
    present = sorted(set(paired.sources.tolist()))
    calibration = [s for s in calibration_sources if s in present] or present
    report = measure(paired, temperature)
    with_pairs = [s for s in calibration if report["sources"][s]["with_fellow"] > 0]
    per_eye = [s for s in with_pairs if s not in PER_PATIENT_LABEL_SOURCES] or with_pairs
    if not per_eye:
        return None

    def mean_auc(weight: float) -> float:
        return float(np.nanmean([_image_auc_at(report, s, weight) for s in per_eye]))

    weight = max(report["weights"], key=mean_auc)
    if weight == 0.0 or mean_auc(weight) <= mean_auc(0.0):
        return None
    cal = np.flatnonzero(np.isin(paired.sources, calibration) & (paired.truth >= 0))
    fused = paired.p_referable(weight, temperature)
    point = travelling_operating_point(fused[cal], paired.truth[cal], paired.sources[cal], min_sensitivity)
    return {
        "weight": weight,
        "referable_threshold": point["threshold"],
        "rule": "fused logits = (1 - weight) x own + weight x mean(fellow eye's graded images)",
        "chosen_on": f"leave-one-source-out predictions of {', '.join(per_eye)} (weight) and of "
        f"{', '.join(calibration)} (threshold, sensitivity >= {min_sensitivity:.2f} on each)",
        "image_auc": {
            s: {"own": _image_auc_at(report, s, 0.0), "fused": _image_auc_at(report, s, weight)} for s in with_pairs
        },
        "operating_point": point,
        "measured": report["leave_one_source_out"],
    }


def write_rule_into_spec(
    spec_path: Path, spec: ModelSpec, paired: Paired, min_sensitivity: float
) -> dict[str, Any] | None:
    """Choose the rule on ``paired`` as ``retinagrade train`` does (on the spec's calibration sources, at its
    temperature) and write it, or its absence, into the spec file; returns the rule."""
    calib = list((spec.raw.get("training", {}).get("config", {}) or {}).get("calibration_sources") or [])
    rule = choose_rule(paired, spec.temperature, calib, min_sensitivity)
    data = spec.to_dict()
    if rule is None:
        data.pop("fellow_eye", None)
    else:
        data["fellow_eye"] = rule
    spec_path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return rule


def _image_auc_at(report: dict[str, Any], source: str, weight: float) -> float:
    return float(report["sources"][source]["by_weight"][f"{weight:.1f}"]["image_auc"])
