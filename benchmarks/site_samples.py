"""Label files for the site-deployment measurements (docs/site-deployment.md, README "Site calibration").

Writes, into ``--out``:

* ``aptos-500.csv``: 500 APTOS 2019 photos, stratified by grade (seed 0), for the ``validate`` timing;
* ``eyepacs-calibration.csv``: a simulated site's calibration sample, about 120 photos of
  ``eyepacs-256-graded`` (EyePACS photos cropped and contrast-equalised by a pipeline the model never saw),
  drawn by patient (both eyes together) and stratified by the patient's worse eye;
* ``eyepacs-rest.csv``: up to ``--rest-photos`` of that set's other photos (no patient in both files), to
  grade with ``--site``.

The shipped model was trained on every ``eyepacs-768`` photo, so that folder cannot play a new site: its
photos are graded almost perfectly (AUC 1.0). Patients who also appear in ``eyepacs-768`` are left out here.

Paths in the CSVs are absolute, so the files can live anywhere. Usage::

    python benchmarks/site_samples.py --out /tmp/site --calibration-photos 140
    retinagrade calibrate --labels /tmp/site/eyepacs-calibration.csv --out /tmp/site/site.json
    retinagrade validate --labels /tmp/site/eyepacs-rest.csv --out /tmp/site/rest-after --site /tmp/site/site.json
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, rows: list[tuple[Path, int, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient"])
        writer.writerows((str(p), g, patient) for p, g, patient in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--calibration-photos", type=int, default=120)
    parser.add_argument("--rest-photos", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    with (args.data / "aptos2019-224" / "labels.csv").open(newline="") as fh:
        aptos = [r for r in csv.DictReader(fh) if r["conflicting_grades"] != "1"]
    by_grade: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in aptos:
        by_grade[int(row["grade"])].append(row)
    chosen: list[tuple[Path, int, str]] = []
    for grade, rows in sorted(by_grade.items()):
        k = round(500 * len(rows) / len(aptos))
        for i in rng.choice(len(rows), size=k, replace=False):
            chosen.append((args.data / "aptos2019-224" / rows[i]["image"], grade, rows[i]["image"]))
    _write(args.out / "aptos-500.csv", chosen[:500])

    with (args.data / "eyepacs-768" / "labels.csv").open(newline="") as fh:
        trained_on = {r["patient"] for r in csv.DictReader(fh)}
    site = "eyepacs-256-graded"
    with (args.data / site / "labels.csv").open(newline="") as fh:
        eyepacs = [r for r in csv.DictReader(fh) if r["patient"] not in trained_on]
    patients: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in eyepacs:
        patients[row["patient"]].append(row)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, rows in patients.items():
        strata[max(int(r["grade"]) for r in rows)].append(patient)
    share = args.calibration_photos / len(eyepacs)
    calibration: set[str] = set()
    for _, members in sorted(strata.items()):
        k = max(1, round(share * len(members)))
        calibration.update(str(p) for p in rng.choice(sorted(members), size=k, replace=False))
    rows_of = {
        name: [
            (args.data / site / r["image"], int(r["grade"]), patient)
            for patient, rows in sorted(patients.items())
            if (patient in calibration) == (name == "calibration")
            for r in rows
        ]
        for name in ("calibration", "rest")
    }
    rest_patients = sorted({p for _, _, p in rows_of["rest"]})
    keep: set[str] = set()
    for patient in rng.permutation(rest_patients):
        if sum(len(patients[p]) for p in keep) >= args.rest_photos:
            break
        keep.add(str(patient))
    rows_of["rest"] = [row for row in rows_of["rest"] if row[2] in keep]
    for name, rows in rows_of.items():
        _write(args.out / f"eyepacs-{name}.csv", rows)
        referable = sum(g >= 2 for _, g, _ in rows)
        print(f"eyepacs-{name}.csv: {len(rows)} photos, {referable} referable")
    print(f"aptos-500.csv: {len(chosen[:500])} photos")


if __name__ == "__main__":
    main()
