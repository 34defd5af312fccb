"""``retinagrade loso-compare``: two recipes' held-out AUCs, paired image by image, per held-out source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.training.ensemble import compare_recipes


def _run(path: Path, images: list[str], source: str, grades: np.ndarray, referable_logit: np.ndarray) -> Path:
    """A LOSO run's logits file holding out ``images`` of ``source`` (plus one training row not held out)."""
    n = len(images) + 1
    logits = np.zeros((n, 5), np.float32)
    logits[:-1, 3] = referable_logit
    grades = np.r_[grades, 0]
    np.savez(
        path,
        logits=logits,
        regression=np.zeros(n, np.float32),
        held=np.r_[np.ones(len(images), bool), False],
        image=np.array([*images, "train.png"]),
        source=np.array([source] * len(images) + ["other"]),
        group=np.array([f"p{i // 2}" for i in range(n)]),
        grade_low=grades,
        grade_high=grades,
    )
    return path


def test_recipes_are_paired_by_image_per_source_whatever_else_they_trained_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 200)
    truth = (grades >= 2).astype(float)
    good, poor = truth * 3 + rng.normal(0, 1, 200), truth * 0.5 + rng.normal(0, 1, 200)
    images = [f"e{i}.png" for i in range(200)]
    a = [_run(tmp_path / "a-e.npz", images, "eyepacs-768", grades, good)]
    # B held out 20 more images A never did (another label list): only the 200 both held out are compared
    b = [_run(tmp_path / "b-e.npz", [*images, *[f"x{i}" for i in range(20)]], "eyepacs-768",
              np.r_[grades, np.zeros(20, int)], np.r_[poor, np.full(20, 5.0)])]  # fmt: skip
    report = compare_recipes(a, b, n_boot=200)
    row = report["sources"]["eyepacs-768"]
    assert row["n"] == 200 and row["auc_a"] > row["auc_b"]
    assert row["difference"]["value"] == pytest.approx(row["auc_a"] - row["auc_b"], abs=1e-3)
    assert 0 < row["difference"]["ci_low"] < row["difference"]["value"] < row["difference"]["ci_high"]
    # the same recipe against itself: no difference
    same = compare_recipes(a, a, n_boot=50)["sources"]["eyepacs-768"]["difference"]
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # two runs of one side holding out one image: seeds, not recipes
    with pytest.raises(ValueError, match="held out by two runs"):
        compare_recipes([*a, a[0]], b)
    result = CliRunner().invoke(app, ["loso-compare", "--a", str(a[0]), "--b", str(b[0]), "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sources"]["eyepacs-768"]["n"] == 200
    missing = CliRunner().invoke(app, ["loso-compare", "--a", str(tmp_path / "none.npz"), "--b", str(b[0])])
    assert missing.exit_code == 2 and "Cannot compare" in missing.output
