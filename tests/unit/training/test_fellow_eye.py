"""Fellow-eye fusion measured on held-out predictions: it is chosen only where the other eye carries signal."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from retinagrade.training import fellow_eye


def _predictions(path: Path, shared: float, seed: int = 0, patients: int = 300) -> Path:
    """Both eyes of every patient; each eye's truth and score share a patient-level part of weight ``shared``."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        disease = rng.normal()
        for eye in ("left", "right"):
            latent = shared * disease + (1 - shared) * rng.normal()
            grade = 3 if latent > 0.8 else 0
            # The model sees the eye with noise; the fellow eye's score carries the shared part again.
            score = latent + rng.normal(scale=0.8)
            logits = [-score, 0.0, score, 0.0, -1.0]
            rows.append(
                {
                    "image": f"images/{p}_{eye}.jpg",
                    "source": "cam",
                    "group": f"cam:{p}",
                    "grade_low": grade,
                    "grade_high": grade,
                    **{f"logit{k}": logits[k] for k in range(5)},
                }
            )
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_fusion_is_chosen_when_the_eyes_share_disease(tmp_path: Path) -> None:
    paired = fellow_eye.Paired.read(_predictions(tmp_path / "p.csv", shared=0.8))
    assert all(len(f) == 1 for f in paired.fellows)
    rule = fellow_eye.choose_rule(paired, 1.0, ["cam"], 0.9)
    assert rule is not None and rule["weight"] > 0
    assert rule["image_auc"]["cam"]["fused"] > rule["image_auc"]["cam"]["own"]
    assert 0 < rule["referable_threshold"] < 1


def test_fusion_is_refused_when_the_eyes_are_independent(tmp_path: Path) -> None:
    paired = fellow_eye.Paired.read(_predictions(tmp_path / "p.csv", shared=0.0))
    assert fellow_eye.choose_rule(paired, 1.0, ["cam"], 0.9) is None


def test_report_has_patient_level_numbers(tmp_path: Path) -> None:
    report = fellow_eye.run(_predictions(tmp_path / "p.csv", shared=0.8), 1.0, tmp_path / "out")
    grid = report["sources"]["cam"]
    assert grid["patients_both_eyes"] == 300 and grid["with_fellow"] == 600
    assert "patient_auc" in grid["by_weight"]["0.3"]
    assert (tmp_path / "out" / "fellow_eye.md").read_text().startswith("# Fellow-eye fusion")


def test_the_command_reports_and_writes_the_rule_or_its_absence_into_the_spec(tmp_path: Path, model_path: Path) -> None:
    from typer.testing import CliRunner

    from retinagrade.cli import app
    from retinagrade.inference.model_spec import ModelSpec

    run = tmp_path / "run"
    run.mkdir()
    spec = run / model_path.name
    spec.write_text(model_path.read_text())
    for other in model_path.parent.iterdir():
        if other.suffix != ".json" or other.name == "gate.json":
            (run / other.name).symlink_to(other.resolve())
    shared = _predictions(run / "loso_predictions.csv", shared=0.8)
    args = ["fellow-eye", str(shared), "--model", str(spec), "--out", str(tmp_path / "out"), "--write-spec"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# Fellow-eye fusion")
    assert (tmp_path / "out" / "fellow_eye.md").read_text() == result.stdout
    rule = ModelSpec.load(spec, verify_checksum=False).fellow_eye
    assert rule is not None and rule.weight > 0
    independent = _predictions(run / "independent.csv", shared=0.0)
    result = CliRunner().invoke(app, ["fellow-eye", str(independent), "--model", str(spec), "--write-spec"])
    assert result.exit_code == 0, result.output
    assert ModelSpec.load(spec, verify_checksum=False).fellow_eye is None
