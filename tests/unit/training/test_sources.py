"""Preparing the fetched sources from tiny fake checkouts: what is copied, what is refused, and how it is read."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.training.data import leave_source_out, read_labels, read_sources
from retinagrade.training.sources import DataSourceError, prepare_source


def _photo(path: Path, shade: int, black: bool = False) -> bytes:
    """A small JPEG: a bright disc of a given shade on black, or an (almost) black frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((64, 64, 3), np.uint8)
    if not black:
        yy, xx = np.mgrid[:64, :64]
        rgb[(yy - 32) ** 2 + (xx - 32) ** 2 < 28**2] = (shade, shade // 2, 20)
    Image.fromarray(rgb).save(path, quality=90)
    return path.read_bytes()


def _fake_mexico(root: Path) -> tuple[Path, Path]:
    """A checkout with the repository's layout and a mexico-512 that holds one of its photos."""
    repo = root / "mexico-repo"
    folder = repo / "EYE FUNDUS" / "EYE FUNDUS1"
    shared_bytes = _photo(folder / "1221_OD_f_1.jpg", 200)
    duplicate = _photo(folder / "0001_OD_f_1.jpg", 180)
    (folder / "0002_OD_f_1.jpg").write_bytes(duplicate)  # another patient id, the same photo
    _photo(folder / "0002_OI_f_2.jpg", 170)
    _photo(folder / "0003_OI_f_1.jpg", 0, black=True)
    _photo(folder / "1221_OI_f_2.jpg", 160)
    _photo(repo / "EYE FUNDUS" / "EYE FUNDUS2" / "1300_OD_f_1.jpg", 150)
    _photo(repo / "EYE FUNDUS" / "EYE FUNDUS2" / "1301_od_f_1.jpg", 140)
    (repo / "EYE FUNDUS" / "EYE FUNDUS2" / "1303_OD_f_1.jpg").write_bytes(shared_bytes)
    (repo / "EYE FUNDUS.csv").write_text(
        "Name,DME,DR,Size,Format\n"
        "0001_OD_f_1,1,-,1000x1000,jpg\n"
        "0002_OD_f_1,1,-,1000x1000,jpg\n"
        "0002_OI_f_2,1,-,1000x1000,jpg\n"
        "0003_OI_f_1,1,-,1000x1000,jpg\n"
        "1221_OD_f_1,0,0,1000x1000,jpg\n"
        "1221_OI_f_2,0,,1000X1000,jpg\n"
        "1300_OD_f_1,1,NPDR,1000x1000,jpg\n"
        "1301_od_f_1,0,PDR,1000x1000,jpg\n"
        "1302_OD_f_1,1,-,1000x1000,jpg\n"
        "1303_OD_f_1,0,0,1000x1000,jpg\n"
        "notes,1,-,1000x1000,jpg\n"
    )
    shared = root / "mexico-512"
    shared.mkdir()
    # split_group M1220: mexico-512 joined this patient with another; mexico-dme must reuse the name.
    (shared / "labels.csv").write_text(
        "image,grade,dr_coarse,dme,patient,eye,split_group\nimages/1221_OD_f_1.jpg,0,noDR,0,M1221,right,M1220\n"
    )
    return repo, shared / "labels.csv"


def test_mexico_copies_only_photos_not_in_mexico_512_and_keeps_its_split_groups(tmp_path: Path) -> None:
    repo, shared = _fake_mexico(tmp_path)
    out = tmp_path / "external"
    report = prepare_source("mexico-dme", repo, out, mexico_512=shared)
    assert not report.commit_checked and "could not be checked" in report.notes[0]
    assert report.dropped == {
        "already in mexico-512": 1,
        "md5-identical to a mexico-512 photo": 1,
        "md5-identical to a photo already kept": 1,
        f"almost black (99th percentile of the brightest channel <= {12})": 1,
        "listed in EYE FUNDUS.csv but missing from the checkout": 1,
        "name not <patient>_<OD|OI>_f_<shot>": 1,
    }
    samples = read_labels(out / "mexico-dme" / "labels.csv")
    by_name = {s.path.name: s for s in samples}
    assert sorted(by_name) == [
        "0001_OD_f_1.jpg",
        "0002_OI_f_2.jpg",
        "1221_OI_f_2.jpg",
        "1300_OD_f_1.jpg",
        "1301_od_f_1.jpg",
    ]
    assert all(s.path.is_file() for s in samples)
    # DR: '-' and '' carry no DR supervision (0-4), NPDR is 1-3, PDR exact 4; DME on every photo
    assert by_name["0001_OD_f_1.jpg"].grade_bounds == (0, 4) and by_name["1221_OI_f_2.jpg"].grade_bounds == (0, 4)
    assert by_name["1300_OD_f_1.jpg"].grade_bounds == (1, 3) and by_name["1301_od_f_1.jpg"].grade_bounds == (4, 4)
    assert [by_name[n].dme for n in sorted(by_name)] == [True, True, False, True, False]
    # patients 0001 and 0002 share a photo: one group; patient 1221 keeps mexico-512's split_group
    assert by_name["0002_OI_f_2.jpg"].group == by_name["0001_OD_f_1.jpg"].group == "mexico:M0001"
    assert by_name["1221_OI_f_2.jpg"].group == "mexico:M1220"
    provenance = json.loads((out / "mexico-dme" / "provenance.json").read_text())
    assert provenance["images"] == 5 and provenance["labels"]["dme"] == {"0": 2, "1": 3}


def test_a_mexico_512_hold_out_also_holds_out_its_patients_other_photos(tmp_path: Path) -> None:
    repo, shared = _fake_mexico(tmp_path)
    prepare_source("mexico-dme", repo, tmp_path / "external", mexico_512=shared)
    images = shared.parent / "images"
    _photo(images / "1221_OD_f_1.jpg", 200)
    samples = read_sources([shared, tmp_path / "external" / "mexico-dme" / "labels.csv"])
    assert samples[0].dme is False and samples[0].source == "mexico-512"
    train, _ = leave_source_out(samples, "mexico-512")
    assert "1221_OI_f_2.jpg" not in {samples[i].path.name for i in train}
    assert len(train) == 4


def test_a_checkout_at_another_commit_is_refused(tmp_path: Path) -> None:
    repo, shared = _fake_mexico(tmp_path)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    with pytest.raises(DataSourceError, match="the sources README names 0cb190a") as info:
        prepare_source("mexico-dme", repo, tmp_path / "external", mexico_512=shared)
    assert info.value.code == "data_source_invalid"
    assert not (tmp_path / "external" / "mexico-dme").exists()


def _fake_400(root: Path) -> tuple[Path, Path, Path]:
    repo = root / "repo"
    rows = []
    for image, grade, unspecified, absent, patient in [
        ("dataset/normal/1_left.jpg", "0", "0", "0", "odir_1"),
        ("dataset/normal/1_right.jpg", "0", "0", "0", "odir_1"),
        ("dataset/glaucoma/2_left.jpg", "", "0", "1", "odir_2"),
        ("dataset/diabetic_retinopathy/3_right.jpg", "", "1", "0", "odir_3"),
        ("dataset/diabetic_retinopathy/4_left.jpg", "2", "0", "0", "odir_4"),
    ]:
        digest = hashlib.md5(_photo(repo / image, 100 + len(rows) * 20)).hexdigest()
        rows.append(f"{image},{grade},{unspecified},{absent},{patient},left,400,400,{digest},kw,50,Male")
    rows[-1] = rows[-1].replace(rows[-1].split(",")[8], "0" * 32)  # the repository's copy differs: refused
    odir = root / "odir-400-labels.csv"
    header = "image,grade,dr_unspecified,dr_keyword_absent,patient,eye,width,height,md5,odir_keywords,age,sex"
    odir.write_text(header + "\n" + "\n".join(rows) + "\n")
    eyepacs_rows = []
    for stem, grade, shade in [("10_left", "0", 90), ("10_right", "3", 60)]:
        digest = hashlib.md5(_photo(repo / "dataset" / "diabetic_retinopathy" / f"{stem}.jpeg", shade)).hexdigest()
        eyepacs_rows.append(f"dataset/diabetic_retinopathy/{stem}.jpeg,{grade},10,left,400,400,{digest},{stem}")
    eyepacs = root / "eyepacs-400-labels.csv"
    eyepacs.write_text("image,grade,patient,eye,width,height,md5,kaggle_image\n" + "\n".join(eyepacs_rows) + "\n")
    return repo, odir, eyepacs


def test_odir_and_eyepacs_400_copy_checked_photos_with_their_grades_and_groups(tmp_path: Path) -> None:
    repo, odir, eyepacs = _fake_400(tmp_path)
    out = tmp_path / "external"
    report = prepare_source("odir-400", repo, out, labels=odir)
    assert report.dropped == {
        "dr_keyword_absent: another disease, DR status not stated": 1,
        "md5 differs from the label file": 1,
    }
    samples = read_labels(out / "odir-400" / "labels.csv")
    assert [(s.path.name, s.grade_bounds, s.group, s.dme) for s in samples] == [
        ("1_left.jpg", (0, 0), "odir:odir_1", None),
        ("1_right.jpg", (0, 0), "odir:odir_1", None),
        ("3_right.jpg", (1, 4), "odir:odir_3", None),
    ]
    prepare_source("eyepacs-400", repo, out, labels=eyepacs)
    other = tmp_path / "eyepacs-768"
    _photo(other / "images" / "10_left.jpg", 80)
    (other / "labels.csv").write_text("image,grade,patient\nimages/10_left.jpg,0,10\n")
    samples = read_sources([out / "eyepacs-400" / "labels.csv", other / "labels.csv"])
    assert [(s.grade, s.group) for s in samples] == [(0, "eyepacs:10"), (3, "eyepacs:10"), (0, "eyepacs:10")]
    train, _ = leave_source_out(samples, "eyepacs-768")
    assert len(train) == 0


def test_cli_refuses_an_unknown_source_with_a_stable_code(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sources", "prepare", "messidor", "--repo", str(tmp_path)])
    assert result.exit_code == 2
    assert "data_source_invalid" in result.output
    listed = CliRunner().invoke(app, ["sources", "list"])
    assert listed.exit_code == 0 and "mexico-dme" in listed.output and "0cb190a" in listed.output
