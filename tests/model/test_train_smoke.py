"""The training front door end to end on a tiny set: CV, calibration, export, parity, card, evaluation.

Small sizes keep it to about a minute on 2 cores; the numbers it produces mean nothing, the artefacts do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from typer.testing import CliRunner

from retinagrade.cli import app


@pytest.fixture
def tiny_labels(tmp_path: Path, shared_data: Path) -> Path:
    """24 APTOS images and 12 EyePACS images (both eyes of 6 patients), all grades present."""
    rows = []
    for folder, per_grade in (("aptos2019-224", 5), ("eyepacs-768", 3)):
        with (shared_data / folder / "labels.csv").open() as fh:
            taken: dict[int, int] = {}
            for row in csv.DictReader(fh):
                grade = int(row["grade"])
                if taken.get(grade, 0) < per_grade and not row.get("duplicate_group"):
                    taken[grade] = taken.get(grade, 0) + 1
                    rows.append((str(shared_data / folder / row["image"]), grade, row.get("patient", "")))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient"])
        writer.writerows(rows)
    return labels


def test_train_export_evaluate_round_trip(tiny_labels: Path, tmp_path: Path, shared_data: Path) -> None:
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--labels",
            str(tiny_labels),
            "--out",
            str(run_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--input-size",
            "96",
            "--frozen-stages",
            "5",
            "--views",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--folds",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "train_config.json",
        "oof_predictions.csv",
        "cv_metrics.json",
        "retinagrade-dr.onnx",
        "retinagrade-dr.json",
        "final.pt",
    ):
        assert (run_dir / name).is_file(), name
    cv = json.loads((run_dir / "cv_metrics.json").read_text())
    assert cv["decision"]["rule"] in {"argmax", "expected_grade", "regression"}
    assert 0.0 < cv["decision"]["temperature"] < 20.0

    models = tmp_path / "models"
    gate = Path(__file__).resolve().parents[2] / "models" / "gate.json"
    photo = shared_data / "raw-fundus-samples/images/16_right.jpeg"
    result = runner.invoke(
        app, ["export", str(run_dir), "--out", str(models), "--gate", str(gate), "--parity-image", str(photo)]
    )
    assert result.exit_code == 0, result.output
    spec = json.loads((models / "retinagrade-dr.json").read_text())
    assert max(spec["export"]["parity_max_abs_diff"].values()) < 1e-3
    assert spec["preprocess"]["input_size"] == 96
    assert "Intended use" in (models / "README.md").read_text()

    result = runner.invoke(
        app, ["grade", str(photo), "--model", str(models / "retinagrade-dr.json"), "-q", "-o", str(tmp_path / "r.csv")]
    )
    assert result.exit_code == 0, result.output

    result = runner.invoke(
        app,
        [
            "evaluate",
            "--predictions",
            str(run_dir / "oof_predictions.csv"),
            "--out",
            str(tmp_path / "report"),
            "--bootstrap",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "metrics.md").read_text().count("|") > 20


def test_end_to_end_mode_trains_without_a_feature_cache(tiny_labels: Path, tmp_path: Path) -> None:
    """The GPU recipe (no cache, augmentation on the fly, stem trainable) runs on the CPU too."""
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train", "--labels", str(tiny_labels), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache"),
            "--input-size", "64", "--no-cache", "--frozen-stages", "0", "--epochs", "1", "--batch-size", "8",
            "--folds", "2", "--no-final",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "cache").glob("stem-*.npy"))
    assert json.loads((run_dir / "cv_metrics.json").read_text())["all"]["n_images"] > 0
