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
