"""The v3 recipe end to end on tiny synthetic sources (no ../shared): DME head, DME folds, LOSO, export, serving.

Synthetic discs at 64 px and one epoch: the numbers mean nothing, the artefacts and their shapes do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.inference.grader import OnnxGrader
from retinagrade.inference.model_spec import CAM_CHANNELS, DME_OUTPUT, OUTPUT_NAMES, ModelSpec

pytestmark = [pytest.mark.train, pytest.mark.slow]


def _source(root: Path, name: str, rows: list[dict[str, str]], draw: Callable[..., np.ndarray]) -> Path:
    folder = root / name
    (folder / "images").mkdir(parents=True)
    for i, row in enumerate(rows):
        image = draw(120, 120, 60, 60, 50, brightness=0.6 + 0.04 * (i % 10), seed=hash((name, i)) % 1000)
        cv2.imwrite(str(folder / row["image"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


@pytest.fixture
def v3_sources(tmp_path: Path, synthetic_fundus: Callable[..., np.ndarray]) -> dict[str, Path]:
    root = tmp_path / "data"
    graded = [{"image": f"images/a{i}.png", "grade": str(i % 5)} for i in range(10)]
    camera = [{"image": f"images/e{i}.png", "grade": str(i % 5), "patient": str(i // 2)} for i in range(10)]
    mexico = [
        {"image": f"images/m{i}.png", "grade": "0" if i % 2 else "4", "dr_coarse": "x", "dme": str(i % 2),
         "patient": f"M{i // 2}", "split_group": f"M{i // 2}"}
        for i in range(12)
    ]  # fmt: skip
    dme_only = [
        {"image": f"images/d{i}.png", "grade": "", "dr_coarse": "unknown", "dme": str(int(i % 3 > 0)),
         "patient": f"M{100 + i}", "split_group": f"M{100 + i}"}
        for i in range(9)
    ]  # fmt: skip
    return {
        "aptos-x": _source(root, "aptos-x", graded, synthetic_fundus),
        "eyepacs-x": _source(root, "eyepacs-x", camera, synthetic_fundus),
        "mexico-512": _source(root, "mexico-512", mexico, synthetic_fundus),
        "mexico-dme": _source(root, "mexico-dme", dme_only, synthetic_fundus),
    }


def _config(tmp_path: Path, sources: dict[str, Path], extra: str = "") -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(
        "labels:\n"
        + "".join(f"  - {sources[n]}\n" for n in ("aptos-x", "eyepacs-x", "mexico-512"))
        + f"optional_labels:\n  - {sources['mexico-dme']}\n  - {tmp_path / 'absent' / 'labels.csv'}\n"
        "input_size: 64\nfrozen_stages: 5\nviews: 1\nartefact_views: 0\nepochs: 1\nbatch_size: 8\nfolds: 0\n"
        "source_balance: 0.5\ndme_weight: 1.0\ndme_folds: 2\nthreads: 1\n"
        f"loso: [eyepacs-x]\ncalibration_sources: [eyepacs-x]\ncache_dir: {tmp_path / 'cache'}\n" + extra
    )
    return config


def test_v3_recipe_trains_a_dme_head_and_exports_a_model_that_serves(
    tmp_path: Path, v3_sources: dict[str, Path]
) -> None:
    config = _config(tmp_path, v3_sources)
    runner = CliRunner()
    dme_dir = tmp_path / "dme"
    # the DME folds as separate runs into one folder; the second one merges the out-of-fold file
    for k in (0, 1):
        result = runner.invoke(app, ["train", "--config", str(config), "--dme-fold", str(k), "--out", str(dme_dir)])
        assert result.exit_code == 0, result.output
        assert not (dme_dir / "retinagrade-dr.onnx").exists() and not (dme_dir / "loso.json").exists()
    summary = json.loads((dme_dir / "dme_cv.json").read_text())
    assert summary["all"]["n"] == 12 + 9 and summary["all"]["dme"] == 6 + 6
    with (dme_dir / "dme_oof.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 21 and {r["source"] for r in rows} == {"mexico-512", "mexico-dme"}
    assert all(np.isfinite(float(r["logit_dme"])) for r in rows)
    oof = np.load(dme_dir / "dme_oof.npz")
    assert set(oof["fold"].tolist()) == {0, 1} and np.isfinite(oof["logit_dme"]).all()

    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    logits = np.load(run_dir / "loso_logits.npz")
    assert logits["logit_dme"].shape == logits["regression"].shape == (41,) and logits["held"].sum() == 10
    with (run_dir / "loso_predictions.csv").open() as fh:
        assert {"logit_dme", "dme_true"} <= set(next(csv.DictReader(fh)))
    spec = ModelSpec.load(run_dir / "retinagrade-dr.json")
    assert spec.outputs == (*OUTPUT_NAMES, DME_OUTPUT) and spec.cam_channels == (*CAM_CHANNELS, DME_OUTPUT)
    batch = np.zeros((2, 3, 64, 64), np.float32)
    grader = OnnxGrader(spec, threads=1)
    outputs = grader.run(batch)
    assert outputs.cam.shape[1] == len(CAM_CHANNELS) + 1
    dme = grader.session.run([DME_OUTPUT], {"input": batch})[0]
    assert dme.shape == (2, 1)
    np.testing.assert_allclose(outputs.cam[:, -1].mean(axis=(1, 2)), dme[:, 0], atol=1e-4)
    training = json.loads((run_dir / "train_config.json").read_text())
    assert training["dme_weight"] == 1.0 and training["optional_labels"][0] == str(v3_sources["mexico-dme"])


def test_levers_train_end_to_end_and_two_fit_seeds_export_as_one_ensemble_graph(
    tmp_path: Path, v3_sources: dict[str, Path]
) -> None:
    """Lite1 with stage 4 trainable (a new cache), flip TTA, the contrastive loss and EMA; two fit seeds of that
    recipe scored as an ensemble on their held-out logits and exported as one graph."""
    extra = "arch: tf_efficientnet_lite1\nflip_tta: true\ncontrastive_weight: 0.2\nema: 0.9\ndme_folds: 0\n"
    config = _config(tmp_path, v3_sources, extra).read_text().replace("frozen_stages: 5", "frozen_stages: 4")
    (tmp_path / "levers.yaml").write_text(config)
    runner = CliRunner()
    runs = [tmp_path / f"member{member}" for member in (0, 1)]
    cached: list[set[str]] = []
    for member, run_dir in enumerate(runs):
        args = [
            "train",
            "--config",
            str(tmp_path / "levers.yaml"),
            "--out",
            str(run_dir),
            "--set",
            f"fit_seed={member}",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        cached.append({p.name for p in (tmp_path / "cache").iterdir()})
    assert cached[0] == cached[1]  # the second member reuses the first one's feature cache
    spec = ModelSpec.load(runs[0] / "retinagrade-dr.json")
    assert spec.raw["training"]["config"]["frozen_stages"] == 4 and spec.outputs[-1] == DME_OUTPUT
    # stage 4 trains: the run's checkpoint holds it in the tail
    assert any(k.startswith("tail.blocks.0.") for k in __import__("torch").load(runs[0] / "final.pt"))

    result = runner.invoke(app, ["ensemble-loso", *map(str, runs), "--out", str(tmp_path / "ens")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert set(report["ensemble"]) == {"eyepacs-x"} and len(report["members"]) == 2
    mean = np.load(tmp_path / "ens" / "loso_logits.npz")
    first, second = np.load(runs[0] / "loso_logits.npz"), np.load(runs[1] / "loso_logits.npz")
    assert not np.allclose(first["logits"][first["held"]], second["logits"][second["held"]])
    np.testing.assert_allclose(mean["logits"][mean["held"]], (first["logits"] + second["logits"])[mean["held"]] / 2)

    models = tmp_path / "models"
    gate = Path(__file__).resolve().parents[3] / "models" / "gate.json"
    args = ["export", str(runs[0]), "--with-run", str(runs[1]), "--out", str(models), "--gate", str(gate)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    exported = ModelSpec.load(models / "retinagrade-dr.json")
    assert exported.raw["ensemble"]["runs"] == [str(r) for r in runs]
    assert max(exported.raw["export"]["parity_max_abs_diff"].values()) < 1e-3
    outputs = OnnxGrader(exported, threads=1).run(np.zeros((1, 3, 64, 64), np.float32))
    assert outputs.cam.shape[1] == len(CAM_CHANNELS) + 1
