"""``grade --pair-eyes``: fellow-eye answers beside the single-image answers, which stay exactly as they were."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from typer.testing import CliRunner

from retinagrade.cli import app

runner = CliRunner()
SINGLE = ("status", "grade", "referable", "confidence", "p0", "p1", "p2", "p3", "p4", "p_referable", "quality")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {Path(r["image"]).name: r for r in csv.DictReader(fh)}


def test_pair_eyes_adds_fellow_eye_answers_and_keeps_single_answers(
    tmp_path: Path, fundus_photos: list[Path], dark_fundus_photo: Path, paired_model: Path
) -> None:
    right, left, *others = fundus_photos
    # Other patients' eyes where there are any, else the same photos again.
    spare_left = next((photo for photo in others if "left" in photo.name), left)
    spare_right = next((photo for photo in others if "right" in photo.name), right)
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(left, folder / "16_OS.jpeg")
    shutil.copy(right, folder / "16_OD.jpeg")
    shutil.copy(spare_left, folder / "605_left.jpeg")  # no fellow eye in the run
    shutil.copy(dark_fundus_photo, folder / "6834_L.jpeg")  # ungradable: no paired answer for anyone
    shutil.copy(spare_right, folder / "6834_R.jpeg")
    plain, paired = tmp_path / "plain.csv", tmp_path / "paired.csv"
    for out, extra in ((plain, []), (paired, ["--pair-eyes"])):
        result = runner.invoke(
            app, ["grade", str(folder), "-o", str(out), "--model", str(paired_model), "--quiet", *extra]
        )
        assert result.exit_code == 0, result.output
    before, after = _rows(plain), _rows(paired)
    assert set(before) == set(after)
    for name, row in before.items():
        assert [after[name][c] for c in SINGLE] == [row[c] for c in SINGLE], name
        assert row["paired_grade"] == "" and row["fellow_images"] == ""
    for eye, other in (("16_OS.jpeg", "16_OD.jpeg"), ("16_OD.jpeg", "16_OS.jpeg")):
        assert after[eye]["paired_grade"] in {"0", "1", "2", "3", "4"}
        assert after[eye]["paired_referable"] in {"true", "false"}
        assert Path(after[eye]["fellow_images"]).name == other
    assert after["605_left.jpeg"]["paired_grade"] == ""
    assert after["6834_L.jpeg"]["status"] == "ungradable" and after["6834_R.jpeg"]["paired_grade"] == ""
    # The fused P(referable) lies between the two eyes' own.
    own = sorted(float(before[n]["p_referable"]) for n in ("16_OS.jpeg", "16_OD.jpeg"))
    fused = float(after["16_OS.jpeg"]["paired_p_referable"])
    assert own[0] - 1e-3 <= fused <= own[1] + 1e-3
