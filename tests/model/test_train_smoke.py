"""The training front door end to end on tiny sets: CV, LOSO, calibration, export, parity, card, evaluation, DDP.

Small sizes keep each test to about a minute on 2 cores; the numbers it produces mean nothing, the artefacts do.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.inference.grader import OnnxGrader
from retinagrade.inference.model_spec import CAM_CHANNELS, OUTPUT_NAMES, ModelSpec
from retinagrade.preprocessing.decode import load_image
from retinagrade.preprocessing.pipeline import batch_tensor, prepare_fundus

pytestmark = [pytest.mark.train]


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


def _subset(shared_data: Path, folder: str, out: Path, keep: int, key: str = "grade") -> Path:
    """A copy of a source's labels.csv with ``keep`` rows per value of ``key`` (absolute image paths)."""
    with (shared_data / folder / "labels.csv").open() as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        taken: dict[str, int] = {}
        rows = []
        for row in reader:
            if row.get("duplicate_group") or taken.get(row[key], 0) >= keep:
                continue
            taken[row[key]] = taken.get(row[key], 0) + 1
            rows.append({**row, "image": str(shared_data / folder / row["image"])})
    (out / folder).mkdir(parents=True)
    path = out / folder / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_sources(tmp_path: Path, shared_data: Path) -> list[Path]:
    """Three small sources, one coarsely labelled: APTOS (all grades), EyePACS-768, Mexico (no DR / NPDR / PDR)."""
    root = tmp_path / "sources"
    return [
        _subset(shared_data, "aptos2019-224", root, 4),
        _subset(shared_data, "eyepacs-768", root, 3),
        _subset(shared_data, "mexico-512", root, 4, key="dr_coarse"),
    ]


def _check_spec_serves(spec_path: Path, photo: Path) -> ModelSpec:
    """The spec training wrote loads as the service loads it, and the grader runs on a real photo."""
    spec = ModelSpec.load(spec_path)
    assert spec.outputs == OUTPUT_NAMES and spec.cam_channels == CAM_CHANNELS
    assert spec.severity_channel == len(CAM_CHANNELS) - 1
    assert 0.0 < spec.temperature < 20.0 and 0.0 <= spec.referable_threshold <= 1.0
    # Every named point carries its per-source held-out sensitivity and specificity, and the default is one of them.
    points = spec.raw["operating_points"]
    assert spec.operating_point == points["default"] in spec.operating_points
    for name, point in points["points"].items():
        assert spec.operating_points[name].threshold == pytest.approx(point["threshold"])
        assert all("sensitivity" in row and "specificity" in row for row in point["per_source"].values())
    assert ModelSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    image = prepare_fundus(load_image(photo, min_side=spec.preprocess.decode_min_side), spec.preprocess).model_image
    outputs = OnnxGrader(spec, threads=1).run(batch_tensor([image], spec.preprocess))
    assert outputs.logits.shape == (1, 5) and outputs.cam.shape[1] == len(spec.cam_channels)
    assert np.isfinite(outputs.logits).all()
    return spec


def test_train_export_evaluate_round_trip(tiny_labels: Path, tmp_path: Path, shared_data: Path) -> None:
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train", "--labels", str(tiny_labels), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache"),
            "--input-size", "96", "--frozen-stages", "5", "--views", "2", "--epochs", "1", "--batch-size", "8",
            "--folds", "2",
        ],
    )  # fmt: skip
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
    assert cv["decision"]["rule"] in {"argmax", "expected_grade"}
    assert 0.0 < cv["decision"]["temperature"] < 20.0
    photo = shared_data / "raw-fundus-samples/images/16_right.jpeg"
    spec = _check_spec_serves(run_dir / "retinagrade-dr.json", photo)
    assert spec.raw["operating_points"] == cv["decision"]["operating_points"]

    models = tmp_path / "models"
    gate = Path(__file__).resolve().parents[2] / "models" / "gate.json"
    result = runner.invoke(
        app, ["export", str(run_dir), "--out", str(models), "--gate", str(gate), "--parity-image", str(photo)]
    )
    assert result.exit_code == 0, result.output
    exported = _check_spec_serves(models / "retinagrade-dr.json", photo)
    assert max(exported.raw["export"]["parity_max_abs_diff"].values()) < 1e-3
    assert exported.preprocess.input_size == 96
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


def test_loso_from_a_config_file_chooses_the_decision_on_held_out_cameras(
    tiny_sources: list[Path], tmp_path: Path, shared_data: Path
) -> None:
    """`train --config` with LOSO: held-out metrics per source, a travelling operating point, a servable spec."""
    config = tmp_path / "train.yaml"
    config.write_text(
        "labels:\n" + "".join(f"  - {p}\n" for p in tiny_sources) + "input_size: 96\nfrozen_stages: 5\nviews: 1\n"
        "artefact_views: 1\nepochs: 1\nbatch_size: 8\nfolds: 0\nsource_balance: 1.0\nema: 0.9\n"
        "loso: [eyepacs-768, mexico-512]\n"
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--config", str(config), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 0, result.output
    loso = json.loads((run_dir / "loso.json").read_text())
    assert set(loso["sources"]) == {"eyepacs-768", "mexico-512"}
    mexico = loso["sources"]["mexico-512"]
    # NPDR (grade 1-3) images are left out of every metric; no DR vs PDR is what is scored
    assert mexico["coarse"]["images_with_grade_range"] == 4
    assert mexico["n_images"] == 8 and mexico["referable"]["counts"]["positives"] == 4
    points = loso["decision"]["operating_points"]
    point = points["points"][points["default"]]
    assert set(loso["by_point"]) == set(points["points"]) == {"balanced", "sensitive"}
    assert set(point["served"]) | set(point["not_served"]) == {"eyepacs-768", "mexico-512"}
    table = (run_dir / "loso.md").read_text()
    assert "mexico-512 (no DR vs PDR)" in table and "eyepacs-768" in table and "Operating point `sensitive`" in table
    with (run_dir / "loso_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["fold"] for r in rows} == {"eyepacs-768", "mexico-512"}
    spec = _check_spec_serves(run_dir / "retinagrade-dr.json", shared_data / "raw-fundus-samples/images/16_right.jpeg")
    assert spec.referable_threshold == pytest.approx(point["threshold"])
    assert spec.raw["training"]["grade_ranges"] == {"mexico-512": 4}
    assert json.loads((run_dir / "train_config.json").read_text())["source_balance"] == 1.0
    # The fellow-eye rule is chosen on the same held-out predictions (or refused), and the spec carries it.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "fellow_eye" in summary
    rule = summary["fellow_eye"]
    if rule is None:
        assert spec.fellow_eye is None
    else:
        assert spec.fellow_eye is not None and spec.fellow_eye.weight == rule["weight"] > 0


def test_unknown_config_key_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("labels: [x.csv]\nepoch: 3\n")
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown training config keys ['epoch']" in result.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_model(tiny_labels: Path, tmp_path: Path) -> None:
    """DistributedDataParallel with gloo on 2 CPU processes; rank 0 alone writes the run."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python (part of PyTorch)")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            torchrun, "--standalone", "--nproc_per_node", "2", "-m", "retinagrade.cli", "train",
            "--labels", str(tiny_labels), "--out", str(run_dir), "--cache-dir", str(tmp_path / "cache"),
            "--input-size", "64", "--frozen-stages", "5", "--views", "1", "--epochs", "1", "--batch-size", "8",
            "--folds", "2", "--threads", "1",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    spec = ModelSpec.load(run_dir / "retinagrade-dr.json")
    assert spec.preprocess.input_size == 64
    assert (run_dir / "oof_predictions.csv").is_file()


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
