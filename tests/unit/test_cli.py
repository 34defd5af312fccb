"""The ``retinagrade`` CLI end to end: folders, bad files, CSV/JSON output, exit codes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.report import CSV_COLUMNS

runner = CliRunner()


@pytest.fixture
def mixed_folder(
    tmp_path: Path, right_eye_photo: Path, left_eye_photo: Path, dark_fundus_photo: Path, not_fundus_photo: Path
) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(right_eye_photo, folder / "16_right.jpeg")
    shutil.copy(dark_fundus_photo, folder / "nested/6834_left.jpeg")
    shutil.copy(not_fundus_photo, folder / f"cat{not_fundus_photo.suffix}")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "fake.jpg").write_bytes(b"%PDF-1.4\n% not an image\n")
    good = left_eye_photo.read_bytes()
    (folder / "nested/truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_grade_folder_to_csv_goes_on_past_bad_files(mixed_folder: Path, tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "results.csv"
    result = runner.invoke(
        app, ["grade", str(mixed_folder), "--output", str(out), "--model", str(model_path), "--quiet"]
    )
    assert result.exit_code == 1, result.output  # some files failed
    with out.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == list(CSV_COLUMNS)
        rows = {Path(r["image"]).name: r for r in reader}
    cat = next(name for name in rows if name.startswith("cat."))
    assert set(rows) == {"16_right.jpeg", "6834_left.jpeg", cat, "empty.jpg", "fake.jpg", "truncated.jpg"}
    graded = rows["16_right.jpeg"]
    assert graded["status"] == "graded"
    assert graded["grade"] in {"0", "1", "2", "3", "4"} and graded["referable"] in {"true", "false"}
    assert abs(sum(float(graded[f"p{k}"]) for k in range(5)) - 1.0) < 1e-2
    assert 0.0 <= float(graded["quality"]) <= 1.0
    assert rows["6834_left.jpeg"]["status"] == "ungradable"
    assert rows["6834_left.jpeg"]["grade"] == "" and rows["6834_left.jpeg"]["p0"] == ""
    assert rows[cat]["status"] == "not_fundus" and rows[cat]["grade"] == ""
    for name in ("empty.jpg", "fake.jpg", "truncated.jpg"):
        assert rows[name]["status"] == "error" and rows[name]["quality"] == ""


def test_grade_json_output_records_error_codes(mixed_folder: Path, tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "results.json"
    result = runner.invoke(
        app,
        [
            "grade",
            str(mixed_folder / "fake.jpg"),
            str(mixed_folder / "16_right.jpeg"),
            "-o",
            str(out),
            "--model",
            str(model_path),
            "--quiet",
        ],
    )
    assert result.exit_code == 1
    rows = json.loads(out.read_text())
    assert rows[0]["status"] == "error" and rows[0]["error_code"] == "unsupported_format"
    assert rows[1]["status"] == "graded"


def test_all_good_files_exit_zero(left_eye_photo: Path, tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(
        app,
        [
            "grade",
            str(left_eye_photo),
            "-o",
            str(out),
            "--model",
            str(model_path),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output


def test_missing_model_is_a_clear_error(tmp_path: Path, left_eye_photo: Path) -> None:
    missing = tmp_path / "nope.json"
    result = runner.invoke(app, ["grade", str(left_eye_photo), "--model", str(missing)])
    assert result.exit_code == 3
    assert "does not exist" in result.output and str(missing) in result.output


def test_no_images_found(tmp_path: Path) -> None:
    result = runner.invoke(app, ["grade", str(tmp_path)])
    assert result.exit_code == 2


def test_grade_at_a_named_operating_point_names_it_in_every_row(
    right_eye_photo: Path, tmp_path: Path, pointed_model: Path
) -> None:
    photo = right_eye_photo
    rows = {}
    for point in ("balanced", "sensitive"):
        out = tmp_path / f"{point}.csv"
        args = ["grade", str(photo), "--model", str(pointed_model), "-q", "-o", str(out)]
        result = runner.invoke(app, [*args, "--operating-point", point])
        assert result.exit_code == 0, result.output
        with out.open() as fh:
            (rows[point],) = list(csv.DictReader(fh))
    assert {"referral_reason", "operating_point", "referable_threshold", "p_dme", "dme"} <= set(CSV_COLUMNS)
    assert (rows["balanced"]["operating_point"], rows["balanced"]["referable_threshold"]) == ("balanced", "0.5")
    assert (rows["sensitive"]["operating_point"], rows["sensitive"]["referable_threshold"]) == ("sensitive", "0.05")
    assert rows["balanced"]["grade"] == rows["sensitive"]["grade"]
    # an unknown point stops the run before any image is read, and leaves no output behind
    out = tmp_path / "unknown.csv"
    result = runner.invoke(
        app, ["grade", str(photo), "--model", str(pointed_model), "-o", str(out), "--operating-point", "lenient"]
    )
    assert result.exit_code == 2 and "lenient" in result.output and not out.exists()
