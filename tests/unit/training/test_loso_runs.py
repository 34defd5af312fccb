"""Separate LOSO runs joined into one held-out table, one decision layer, and a spec that carries it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")

from retinagrade.files import sha256_file
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.training.loso_runs import join_runs, report_runs, write_layer_into_spec

MODELS = Path(__file__).resolve().parents[3] / "models"


def _labels(root: Path, name: str, grades: np.ndarray) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    path = folder / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade", "patient"])
        for i, grade in enumerate(grades):
            writer.writerow([f"images/{i // 2}_{'left' if i % 2 else 'right'}.jpg", int(grade), f"{name}{i // 2}"])
    return path


def _logits(rng: np.random.Generator, grades: np.ndarray, sharpness: float) -> np.ndarray:
    logits = rng.normal(0, 1, (len(grades), 5))
    logits[np.arange(len(grades)), grades] += sharpness
    return logits


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    grades_a = rng.choice(5, 400, p=[0.5, 0.1, 0.25, 0.07, 0.08])
    grades_b = rng.choice(5, 300, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    labels = [str(_labels(tmp_path, "set-a", grades_a)), str(_labels(tmp_path, "set-b", grades_b))]
    n = len(grades_a) + len(grades_b)
    made = []
    for k, (held_source, seed) in enumerate([("a", 1), ("b", 2), ("a", 3)]):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "train_config.json").write_text(json.dumps({"labels": labels}))
        held = np.zeros(n, bool)
        held[: len(grades_a)] = held_source == "a"
        held[len(grades_a) :] = held_source == "b"
        logits = np.zeros((n, 5), np.float32)
        truth = np.concatenate([grades_a, grades_b])
        logits[held] = _logits(np.random.default_rng(seed), truth[held], 2.0)
        np.savez(run / "loso_logits.npz", logits=logits, regression=np.zeros(n, np.float32), held=held)
        made.append(run)
    return made


def test_runs_of_other_sources_join_and_runs_of_the_same_source_average(runs: list[Path]) -> None:
    joined = join_runs(runs)
    assert joined.holdout == ["set-a", "set-b"]
    assert joined.held.all()
    votes = joined.votes
    assert set(votes[joined.inputs.sources == "set-a"]) == {2} and set(votes[joined.inputs.sources == "set-b"]) == {1}
    first = np.load(runs[0] / "loso_logits.npz")["logits"]
    third = np.load(runs[2] / "loso_logits.npz")["logits"]
    part = joined.inputs.sources == "set-a"
    assert np.allclose(joined.predictions.logits[part], (first[part] + third[part]) / 2, atol=1e-5)


def test_runs_join_over_the_optional_label_files_they_read_and_their_dme_negatives(
    runs: list[Path], tmp_path: Path
) -> None:
    """A v3 run read ``labels`` plus the ``optional_labels`` present and took grade-0 photos as DME negatives:
    the join reads the same samples (its rows would not line up otherwise)."""
    config = json.loads((runs[0] / "train_config.json").read_text())
    extra, part = config["labels"].pop(), tmp_path / "absent" / "labels.csv"
    for run in runs:
        settings = {**config, "optional_labels": [extra, str(part)], "dme_negative_sources": ["set-b"]}
        (run / "train_config.json").write_text(json.dumps(settings))
    joined = join_runs(runs)
    assert len(joined.inputs.samples) == 700 and joined.holdout == ["set-a", "set-b"]
    negatives = {s.source for s in joined.inputs.samples if s.dme is False}
    assert negatives == {"set-b"} and all(s.grade == 0 for s in joined.inputs.samples if s.dme is False)


def test_runs_over_other_label_files_are_refused(runs: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_config.json").write_text(json.dumps({"labels": ["elsewhere.csv"]}))
    with pytest.raises(ValueError, match="other label files"):
        join_runs([runs[0], other])


def test_the_report_fits_one_layer_and_the_spec_takes_it_with_the_same_model(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = report_runs(runs, out)
    assert {"balanced", "sensitive"} == set(report["by_point"])
    assert report["ensemble_size"] == {"set-a": 2, "set-b": 1}
    assert "Operating point `balanced` (default)" in (out / "loso.md").read_text()
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    before = sha256_file(models / "retinagrade-dr.onnx")
    spec = write_layer_into_spec(models / "retinagrade-dr.json", report, out / "loso_predictions.csv")
    assert sha256_file(models / "retinagrade-dr.onnx") == before == spec.sha256
    layer = report["decision"]
    assert spec.operating_point == "balanced" and set(spec.operating_points) == {"balanced", "sensitive"}
    assert spec.referable_threshold == pytest.approx(layer["operating_points"]["points"]["balanced"]["threshold"])
    assert spec.temperature == pytest.approx(layer["temperature"]) and spec.decision.rule == layer["rule"]
    assert spec.with_operating_point("sensitive").referable_threshold <= spec.referable_threshold
    # It reads back as the service reads it.
    again = ModelSpec.load(models / "retinagrade-dr.json")
    assert again.to_dict() == spec.to_dict()


def test_the_runs_configuration_or_the_caller_names_the_sources_that_set_the_points(
    runs: list[Path], tmp_path: Path
) -> None:
    # No source the configuration names is held out here (defaults: the camera sets): every source counts.
    assert report_runs(runs, tmp_path / "all")["decision"]["point_sources"] == ["set-a", "set-b"]
    config = json.loads((runs[0] / "train_config.json").read_text())
    (runs[0] / "train_config.json").write_text(json.dumps({**config, "calibration_sources": ["set-a"]}))
    named = report_runs(runs, tmp_path / "named")["decision"]
    assert named["point_sources"] == ["set-a"]
    assert set(named["operating_points"]["points"]["balanced"]["per_source"]) == {"set-a"}
    assert report_runs(runs, tmp_path / "given", ["set-b"])["decision"]["point_sources"] == ["set-b"]
