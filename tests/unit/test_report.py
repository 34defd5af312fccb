"""Result records and the streaming writers: every format says the same thing, and a bad name never breaks one."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retinagrade.errors import CorruptImageError
from retinagrade.inference.postprocess import GradeDecision
from retinagrade.pipeline import GradeResult
from retinagrade.preprocessing.quality import QualityAssessment
from retinagrade.report import (
    CSV_COLUMNS,
    PLUGGED_FORMATS,
    WRITERS,
    format_for,
    open_writer,
    printable_name,
    to_record,
    writer_entry,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _graded(grade: int = 4, referable: bool = True) -> GradeResult:
    decision = GradeDecision(
        grade=grade,
        grade_name="proliferative DR",
        referable=referable,
        referral_reason="grade" if grade >= 2 else ("risk" if referable else "none"),
        probabilities=(0.1, 0.1, 0.1, 0.1, 0.6),
        p_referable=0.8,
        confidence=0.6,
        operating_point="balanced",
        referable_threshold=0.35,
        urgency="urgent" if grade == 4 else ("refer" if referable else "routine"),
    )
    quality = QualityAssessment(is_fundus=True, gradable=True, score=0.95, reasons=(), fundus_score=0.97)
    return GradeResult("graded", quality, decision, "ab" * 32, (3000, 2000), {}, {"ImageLaterality": "L"})


def test_a_graded_result_becomes_one_flat_record() -> None:
    record = to_record("eye.jpg", _graded()).to_dict()
    assert record["status"] == "graded" and record["grade"] == 4 and record["referable"] is True
    assert record["urgency"] == "urgent" and record["action"] == "refer_urgently"
    assert [record[f"p{k}"] for k in range(5)] == [0.1, 0.1, 0.1, 0.1, 0.6]
    assert record["width"] == 3000 and record["metadata"] == {"ImageLaterality": "L"}
    assert record["error_code"] == ""
    # every referral names its reason and the operating point that made it
    assert (record["referral_reason"], record["operating_point"], record["referable_threshold"]) == (
        "grade",
        "balanced",
        0.35,
    )
    assert record["fundus_score"] == 0.97  # the detector's own score travels beside the gate's verdict


def test_an_error_becomes_a_record_with_its_code() -> None:
    record = to_record("bad.jpg", CorruptImageError("The file is damaged.")).to_dict()
    assert record["status"] == "error" and record["error_code"] == "corrupt_image"
    assert record["error_message"] == "The file is damaged." and record["grade"] is None
    assert record["urgency"] == "retake" and record["action"] == "resend_file"


def test_the_audit_view_holds_no_names_or_patient_tags() -> None:
    audit = to_record("Jane Doe right.jpg", _graded()).without_identifiers()
    assert "image" not in audit and "metadata" not in audit
    assert "Jane" not in json.dumps(audit) and "ImageLaterality" not in json.dumps(audit)


def test_writers_are_chosen_by_suffix() -> None:
    assert {"csv", "json", "jsonl"} <= set(WRITERS)
    assert format_for(Path("out/r.CSV")) == "csv"
    assert format_for(Path("r.json")) == "json"
    assert format_for(Path("r.ndjson")) == "jsonl"
    with pytest.raises(ValueError, match="no output format"):
        format_for(Path("r.xlsx"))


def test_json_and_jsonl_are_valid_after_every_row(tmp_path: Path) -> None:
    for suffix in (".json", ".jsonl"):
        path = tmp_path / f"r{suffix}"
        writer = open_writer(path)
        writer.write(to_record("a.jpg", _graded()))
        writer.write(to_record("b.jpg", CorruptImageError("damaged")))
        if suffix == ".jsonl":  # every finished line is complete before close
            assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == ["a.jpg", "b.jpg"]
        writer.close()
        text = path.read_text()
        rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
        assert [r["status"] for r in rows] == ["graded", "error"]


def test_an_empty_json_report_is_an_empty_array(tmp_path: Path) -> None:
    writer = open_writer(tmp_path / "r.json")
    writer.close()
    assert json.loads((tmp_path / "r.json").read_text()) == []


def test_csv_rows_are_on_disk_before_the_writer_closes(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    writer = open_writer(path)
    writer.write(to_record("a.jpg", _graded()))
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["a.jpg"] and rows[0]["grade"] == "4"
    writer.close()


def test_an_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("precious\n")
    with pytest.raises(FileExistsError):
        open_writer(path)
    assert path.read_text() == "precious\n"
    open_writer(path, overwrite=True).close()
    assert path.read_text().startswith("image,status")


@pytest.mark.parametrize("name", ["=1+2.jpg", "+cmd.jpg", "-2+3.jpg", "@SUM(A1).jpg", "\tx.jpg", "\rx.jpg"])
def test_csv_neutralises_formula_leading_cells(name: str) -> None:
    buffer = io.StringIO()
    writer = open_writer(buffer, "csv")
    writer.write(to_record(name, CorruptImageError('=HYPERLINK("http://x")')))
    writer.close()
    (row,) = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert row["image"] == "'" + name
    assert row["error_message"].startswith("'=")


def test_csv_numbers_are_not_quoted_or_prefixed() -> None:
    buffer = io.StringIO()
    writer = open_writer(buffer, "csv")
    writer.write(to_record("a.jpg", _graded()))
    (row,) = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert row["p4"] == "0.6" and row["quality"] == "0.95" and row["referable"] == "true"
    assert list(row) == list(CSV_COLUMNS) and row["ImageLaterality"] == "L"


def test_a_file_name_that_is_not_utf8_is_written_not_crashed_on(tmp_path: Path) -> None:
    name = os.fsdecode(b"/photos/caf\xe9-\xff.jpg")  # Latin-1 bytes: surrogate escapes in a str
    assert printable_name(name) == "/photos/caf\\xe9-\\xff.jpg"
    for suffix in (".csv", ".json", ".jsonl"):
        path = tmp_path / f"r{suffix}"
        writer = open_writer(path)
        writer.write(to_record(name, _graded()))
        writer.close()
        assert "caf\\\\xe9" in path.read_text() or "caf\\xe9" in path.read_text()
        path.read_bytes().decode("utf-8")  # strict UTF-8 throughout


@pytest.mark.parametrize("fmt", sorted(PLUGGED_FORMATS))
def test_a_plugged_format_is_registered_by_its_module_with_the_suffixes_announced(fmt: str) -> None:
    plugged = PLUGGED_FORMATS[fmt]
    for need in plugged.needs:
        pytest.importorskip(need, reason=f"needs the [{plugged.extra}] extra ({need})")
    entry = writer_entry(fmt)
    assert entry.suffixes == plugged.suffixes
    assert entry.factory.__module__ == plugged.module  # the writer lives with its extra's code
    assert all(format_for(Path(f"r{suffix}")) == fmt for suffix in plugged.suffixes)


@pytest.mark.parametrize(
    ("suffix", "missing", "message"),
    [
        (".parquet", "pyarrow", "Parquet output needs the [cluster] extra"),
        (".fhir.json", "fhir.resources", "FHIR output needs the [dicom] extra"),
    ],
)
def test_a_format_whose_extra_is_missing_is_refused_before_its_file_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, missing: str, message: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    path = tmp_path / f"r{suffix}"
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_writer(path)
    assert not path.exists()


def test_the_extras_load_only_for_their_own_format(tmp_path: Path) -> None:
    """A CSV run imports neither pyarrow nor fhir.resources (nor the modules that use them), though it knows
    both formats by their suffixes."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from retinagrade.errors import CorruptImageError\n"
        "from retinagrade.report import format_for, open_writer, to_record\n"
        "assert format_for(Path('r.parquet')) == 'parquet' and format_for(Path('r.fhir.json')) == 'fhir'\n"
        "writer = open_writer(Path(sys.argv[1]))\n"
        "writer.write(to_record('a.jpg', CorruptImageError('damaged')))\n"
        "writer.close()\n"
        "loaded = [m for m in ('pyarrow', 'fhir.resources', 'retinagrade.cluster.records', 'retinagrade.interop.fhir')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    out = tmp_path / "r.csv"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text().count("\n") == 2
