"""Label readers for the three layouts, duplicate handling, and leak-free folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retinagrade.training.data import LAYOUTS, UNKNOWN_GRADE, leave_source_out, make_folds, read_labels, read_sources


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


def test_coarse_layout_turns_npdr_into_a_grade_range(tmp_path: Path) -> None:
    folder = tmp_path / "mexico-512"
    _touch(folder / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    (folder / "labels.csv").write_text(
        "image,grade,dr_coarse,dme,patient,eye,split_group\n"
        "images/a.jpg,0,noDR,0,M1,right,M1\n"
        "images/b.jpg,,NPDR,1,M2,left,M2\n"
        "images/c.jpg,4,PDR,0,M3,left,M2\n"
        "images/d.jpg,4,PDR,0,M4,right,M4\n"
    )
    samples = read_labels(folder / "labels.csv")
    assert [s.grade_bounds for s in samples] == [(0, 0), (1, 3), (4, 4), (4, 4)]
    assert samples[1].grade == UNKNOWN_GRADE and not samples[1].exact and samples[0].exact
    # split_group joins patients M2 and M3 (they share a photo)
    assert samples[1].group == samples[2].group != samples[3].group
    (folder / "bad.csv").write_text("image,grade,dr_coarse\nimages/a.jpg,,PDR\n")
    with pytest.raises(ValueError, match="only NPDR"):
        read_labels(folder / "bad.csv")


def _eyepacs_folder(root: Path, name: str, stems: list[str]) -> Path:
    folder = root / name
    _touch(folder / "images", [f"{s}.jpg" for s in stems])
    lines = [f"images/{s}.jpg,0,{s.split('_')[0]}" for s in stems]
    (folder / "labels.csv").write_text("image,grade,patient\n" + "\n".join(lines) + "\n")
    return folder / "labels.csv"


def test_eyepacs_folders_share_patient_groups_and_loso_never_trains_on_a_held_out_patient(tmp_path: Path) -> None:
    a = _eyepacs_folder(tmp_path, "eyepacs-768", ["1_left", "1_right", "2_left"])
    # patient 1's left eye is also in the 256 px folder (same photo, other resolution); patient 3 is not held out
    b = _eyepacs_folder(tmp_path, "eyepacs-256-graded", ["1_left", "3_left", "3_right"])
    _touch(tmp_path / "aptos-x" / "images", ["z.jpg"])
    (tmp_path / "aptos-x" / "labels.csv").write_text("image,grade\nimages/z.jpg,2\n")
    samples = read_sources([a, b, tmp_path / "aptos-x" / "labels.csv"])
    assert samples[0].group == samples[3].group == "eyepacs:1"
    train, test = leave_source_out(samples, "eyepacs-768")
    assert [samples[i].path.parent.parent.name for i in test] == ["eyepacs-768"] * 3
    assert sorted(samples[i].path.name for i in train) == ["3_left.jpg", "3_right.jpg", "z.jpg"]
    folds = make_folds(samples, n_folds=2, seed=0)
    assert folds[0] == folds[1] == folds[3]
    with pytest.raises(ValueError, match="no images from source"):
        leave_source_out(samples, "mexico-512")
    with pytest.raises(ValueError, match="already read"):
        read_sources([a, a])


def test_every_layout_is_a_row_of_the_table() -> None:
    assert [layout.name for layout in LAYOUTS] == ["coarse-dr", "plain", "eyepacs-kaggle", "aptos-kaggle"]


def test_coarse_layout_reads_dr_of_unknown_stage_unknown_dr_and_dme(tmp_path: Path) -> None:
    folder = tmp_path / "odir-400"
    _touch(folder / "images", ["a.jpg", "b.jpg", "c.jpg"])
    (folder / "labels.csv").write_text(
        "image,grade,dr_coarse,dme,patient,split_group\n"
        "images/a.jpg,,DR,,p1,\n"
        "images/b.jpg,,unknown,1,p2,\n"
        "images/c.jpg,2,NPDR,0,p3,\n"
    )
    samples = read_labels(folder / "labels.csv")
    assert [(s.grade_bounds, s.dme, s.group) for s in samples] == [
        ((1, 4), None, "odir:p1"),
        ((0, 4), True, "odir:p2"),
        ((2, 2), False, "odir:p3"),
    ]
    (folder / "bad.csv").write_text("image,grade,dr_coarse,dme\nimages/a.jpg,0,noDR,yes\n")
    with pytest.raises(ValueError, match="dme must be 0, 1 or empty"):
        read_labels(folder / "bad.csv")
