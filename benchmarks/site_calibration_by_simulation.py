"""How well does `retinagrade calibrate` set a site's operating point? Simulated on held-out predictions.

A site calibrates on N of its own graded photos and then grades the rest. This script plays that many times on
the leave-one-source-out predictions of one held-out source (a camera the model never trained on, as a new site
is): draw N photos by patient, run the calibration code itself (:func:`retinagrade.training.calibrate.
calibrate_site`, which refits the temperature, the site threshold and the grade rule), apply the profile to the
other photos of that source, and measure sensitivity and specificity there with the product's referral rule.
It prints the median and the 10th-90th percentiles over the draws, for the point-estimate rule (the default)
and for ``--conservative``, beside the best single threshold on the whole source (what an oracle would pick).

    python benchmarks/site_calibration_by_simulation.py runs/loso-v2/loso_predictions.csv --source eyepacs-768 \
        --sample 120 --draws 100
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from retinagrade.constants import NUM_GRADES
from retinagrade.errors import CalibrationSampleError
from retinagrade.inference.model_spec import Decision, ModelSpec
from retinagrade.preprocessing.pipeline import PreprocessConfig
from retinagrade.training import metrics
from retinagrade.training.calibrate import calibrate_site, model_grades, site_grades
from retinagrade.training.decisions import referred


def _read(path: Path, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, exact grades, groups) of one source's exactly graded held-out rows."""
    logits, grades, groups = [], [], []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            if row["source"] != source or row["grade_true"] == "":
                continue
            logits.append([float(row[f"logit{k}"]) for k in range(NUM_GRADES)])
            grades.append(int(row["grade_true"]))
            groups.append(row["group"])
    return np.array(logits), np.array(grades), np.array(groups)


def _rates(refer: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return float(refer[truth].mean()), float((~refer[~truth]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="loso_predictions.csv of `retinagrade loso-report`")
    parser.add_argument("--source", required=True, help="the held-out source that plays the new site")
    parser.add_argument("--spec", type=Path, default=None, help="the model spec whose layer is the 'before'")
    parser.add_argument("--sample", type=int, default=120, help="photos the site grades to calibrate")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--min-sensitivity", type=float, default=0.90)
    args = parser.parse_args()

    logits, grades, groups = _read(args.predictions, args.source)
    spec = (
        ModelSpec.load(args.spec)
        if args.spec
        else ModelSpec("sim", "0", "m.onnx", "", PreprocessConfig(), 1.0, Decision("argmax"), 0.5)
    )
    truth = grades >= 2
    probs_spec = metrics.softmax(logits, spec.temperature)
    rng = np.random.default_rng(0)
    patients = np.unique(groups)
    results: dict[str, list[tuple[float, float]]] = {"point estimate": [], "conservative": []}
    skipped = 0
    for _ in range(args.draws):
        order = rng.permutation(patients)
        chosen: list[str] = []
        count = 0
        for patient in order:
            chosen.append(patient)
            count += int((groups == patient).sum())
            if count >= args.sample:
                break
        cal = np.isin(groups, chosen)
        rest = ~cal
        reported = model_grades(probs_spec[cal], spec, np.zeros(int(cal.sum()), int))
        too_small = False
        for label, conservative in (("point estimate", False), ("conservative", True)):
            try:
                profile = calibrate_site(
                    grades[cal],
                    probs_spec[cal],
                    groups[cal],
                    spec,
                    name="sim",
                    reported_grades=reported,
                    min_sensitivity=args.min_sensitivity,
                    conservative=conservative,
                    n_boot=1,
                )
            except CalibrationSampleError:  # a draw too small to calibrate on is skipped and counted once
                too_small = True
                continue
            probs = metrics.softmax(logits[rest], profile.temperature)
            site_grade = (
                site_grades(probs, profile.decision_thresholds)
                if profile.decision_thresholds is not None
                else model_grades(probs, spec, np.zeros(int(rest.sum()), int))
            )
            refer = referred(site_grade, metrics.referable_probability(probs), profile.referable_threshold)
            results[label].append(_rates(refer, truth[rest]))
        skipped += too_small
    p = metrics.referable_probability(probs_spec)
    model_grade = model_grades(probs_spec, spec, np.zeros(len(grades), int))
    best = max(
        (_rates(referred(model_grade, p, t), truth) for t in np.linspace(0, 1, 1001)),
        key=lambda r: (r[0] >= args.min_sensitivity, r[1] if r[0] >= args.min_sensitivity else r[0]),
    )
    print(f"source {args.source}: {len(grades)} photos, {int(truth.sum())} referable; sample {args.sample}")
    print(
        f"best single threshold on the whole source (the model's grade rule): sensitivity {best[0]:.3f}, "
        f"specificity {best[1]:.3f}"
    )
    for label, rows in results.items():
        if not rows:
            continue
        arr = np.array(rows)
        lo, med, hi = np.percentile(arr, [10, 50, 90], axis=0)
        print(
            f"{label:15s} ({len(rows)} draws): sensitivity {med[0]:.3f} ({lo[0]:.3f}-{hi[0]:.3f}), "
            f"specificity {med[1]:.3f} ({lo[1]:.3f}-{hi[1]:.3f}) on the other photos"
        )
    print(f"draws too small to calibrate on: {skipped}")


if __name__ == "__main__":
    main()
