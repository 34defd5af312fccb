"""Label readers for the three layouts, duplicate handling, and leak-free folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retinagrade.training.data import make_folds, read_labels


def _touch(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_plain_layout_keeps_majority_grade_and_drops_tied_duplicates(tmp_path: Path) -> None:
    _touch(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg"])
    (tmp_path / "labels.csv").write_text(
        "image,grade,duplicate_group,conflicting_grades\n"
        "images/a.jpg,0,,0\n"
        "images/b.jpg,2,1,1\n"
        "images/c.jpg,2,1,1\n"
        "images/d.jpg,3,1,1\n"
        "images/e.jpg,0,2,1\n"
        "images/f.jpg,4,2,1\n"
        "images/g.jpg,1,,0\n"
    )
    samples = read_labels(tmp_path / "labels.csv")
    by_name = {s.path.name: s.grade for s in samples}
    # group 1: one representative with the majority grade 2; group 2 ties 0 vs 4 and is dropped
    assert by_name == {"a.jpg": 0, "b.jpg": 2, "g.jpg": 1}


def test_eyepacs_layout_groups_both_eyes_of_a_patient(tmp_path: Path) -> None:
    _touch(tmp_path / "train", ["10_left.jpeg", "10_right.jpeg", "13_left.jpeg"])
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,2\n13_left,4\n")
    samples = read_labels(tmp_path / "trainLabels.csv")
    assert [s.grade for s in samples] == [0, 2, 4]
    assert samples[0].group == samples[1].group != samples[2].group
    assert samples[0].path == tmp_path / "train" / "10_left.jpeg"


def test_aptos_layout(tmp_path: Path) -> None:
    _touch(tmp_path / "train_images", ["000c.png", "001d.png"])
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n000c,3\n001d,0\n")
    samples = read_labels(tmp_path / "train.csv")
    assert [(s.path.name, s.grade) for s in samples] == [("000c.png", 3), ("001d.png", 0)]


def test_unknown_layout_and_bad_grade_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("file,label\na,1\n")
    with pytest.raises(ValueError, match="unknown label layout"):
        read_labels(tmp_path / "x.csv")
    _touch(tmp_path, ["a.jpg"])
    (tmp_path / "y.csv").write_text("image,grade\na.jpg,7\n")
    with pytest.raises(ValueError, match="grade outside"):
        read_labels(tmp_path / "y.csv")


def test_folds_never_split_a_group_and_are_stratified(tmp_path: Path) -> None:
    names = [f"{p}_{eye}.jpeg" for p in range(200) for eye in ("left", "right")]
    _touch(tmp_path / "train", names)
    rng = np.random.default_rng(0)
    grades = rng.choice(5, size=200, p=[0.5, 0.1, 0.25, 0.05, 0.1])
    lines = [f"{p}_{eye},{grades[p]}" for p in range(200) for eye in ("left", "right")]
    (tmp_path / "trainLabels.csv").write_text("image,level\n" + "\n".join(lines) + "\n")
    samples = read_labels(tmp_path / "trainLabels.csv")
    folds = make_folds(samples, n_folds=5, seed=0)
    for i in range(0, len(samples), 2):
        assert folds[i] == folds[i + 1]
    share_zero = [np.mean([s.grade == 0 for s, f in zip(samples, folds, strict=True) if f == k]) for k in range(5)]
    assert max(share_zero) - min(share_zero) < 0.15
