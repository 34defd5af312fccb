"""``retinagrade evaluate --data`` end to end on a labelled set of real photographs.

Before the batch engine, evaluation re-parsed the CLI's rows, rounded to 4 decimals, and a few hundred images
were enough for one row to round to a sum of 0.9998 and make the metrics refuse the whole run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinagrade.cli import app

N_IMAGES = 300


def _labels_subset(shared_data: Path, out: Path, n: int) -> Path:
    """The first ``n`` APTOS rows, with image paths made absolute so the CSV can live anywhere."""
    source = shared_data / "aptos2019-224"
    with (source / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "grade", "duplicate_group"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {"image": str(source / row["image"]), "grade": row["grade"], "duplicate_group": row["duplicate_group"]}
            )
    return path


@pytest.mark.shared_data
@pytest.mark.slow
def test_evaluate_data_on_300_real_images(shared_data: Path, tmp_path: Path, model_path: Path) -> None:
    labels = _labels_subset(shared_data, tmp_path / "set", N_IMAGES)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(labels), "--model", str(model_path), "--out", str(out), "--bootstrap", "50"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    statuses = report["extra"]["statuses"]
    assert sum(statuses.values()) == N_IMAGES and statuses.get("error", 0) == 0
    assert sum(report["extra"]["not_graded_by_true_grade"].values()) == N_IMAGES - statuses["graded"]
    assert report["metrics"]["n_images"] == statuses["graded"]
    qwk = report["metrics"]["qwk"]
    assert 0.0 < qwk["ci_low"] <= qwk["value"] <= qwk["ci_high"] <= 1.0
