"""``retinagrade grade`` never loses work (issue 8 C): odd names, odd files, interruptions, existing outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retinagrade.cli import EXIT_FILE_ERRORS, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, app

runner = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def photo(synthetic_fundus: Callable[..., np.ndarray]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_fundus(320, 240, 160, 120, 110)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _grade(*args: str | Path, model: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["grade", *map(str, args), "--model", str(model), "-q"])
    return result.exit_code, result.output


def test_a_file_name_that_is_not_utf8_gets_its_row(tmp_path: Path, photo: bytes, model_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = os.fsdecode(os.fsencode(folder) + b"/caf\xe9_left.jpg")  # Latin-1 bytes on a UTF-8 system
    Path(odd).write_bytes(photo)
    (folder / "plain.jpg").write_bytes(photo)
    out = tmp_path / "r.csv"
    code, output = _grade(folder, "-o", out, model=model_path)
    assert code == EXIT_OK, output
    rows = _rows(out)
    assert sorted(Path(r["image"]).name for r in rows) == ["caf\\xe9_left.jpg", "plain.jpg"]
    assert all(r["status"] != "error" for r in rows)


def test_an_unwritable_output_is_refused_before_grading(tmp_path: Path, photo: bytes) -> None:
    (tmp_path / "a.jpg").write_bytes(photo)
    (tmp_path / "not-a-folder").write_text("x")
    # A model that does not exist: were the output checked after loading, the exit code would be 3.
    code, output = _grade(tmp_path / "a.jpg", "-o", tmp_path / "not-a-folder" / "r.csv", model=tmp_path / "no.json")
    assert code == EXIT_USAGE
    assert "Cannot write" in output


def test_an_existing_output_is_kept_unless_overwrite(tmp_path: Path, photo: bytes, model_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo)
    out = tmp_path / "r.csv"
    out.write_text("last week's results\n")
    code, output = _grade(tmp_path / "a.jpg", "-o", out, model=model_path)
    assert code == EXIT_USAGE and "--overwrite" in output
    assert out.read_text() == "last week's results\n"
    code, _ = _grade(tmp_path / "a.jpg", "-o", out, "--overwrite", model=model_path)
    assert code == EXIT_OK and _rows(out)[0]["image"].endswith("a.jpg")


def test_exit_codes_are_documented_in_help() -> None:
    result = runner.invoke(app, ["grade", "--help"])
    text = " ".join(result.output.split())
    for words in ("0 all graded", "1 some files had errors", "2 usage", "3 the run failed", "130 interrupted"):
        assert words in text


def test_odd_entries_of_a_folder_each_get_an_error_row(tmp_path: Path, photo: bytes, model_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(photo)
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "folder.jpg").mkdir()
    out = tmp_path / "r.csv"
    code, output = _grade(folder, "-o", out, model=model_path)
    assert code == EXIT_FILE_ERRORS, output
    rows = {Path(r["image"].lstrip("'")).name: r for r in _rows(out)}
    assert {n: rows[n]["error_code"] for n in ("broken.jpg", "loop.jpg", "pipe.jpg", "folder.jpg")} == {
        "broken.jpg": "file_not_found",
        "loop.jpg": "unreadable_file",
        "pipe.jpg": "not_a_file",
        "folder.jpg": "not_a_file",
    }
    assert all(rows[n]["status"] == "error" for n in ("broken.jpg", "loop.jpg", "pipe.jpg", "folder.jpg"))
    assert rows["good.jpg"]["status"] != "error"


def test_a_name_that_reads_as_a_formula_is_neutralised(
    tmp_path: Path, photo: bytes, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "=1+2.jpg").write_bytes(photo)
    monkeypatch.chdir(tmp_path)
    code, output = _grade("=1+2.jpg", "-o", "r.csv", model=model_path)
    assert code == EXIT_OK, output
    (row,) = _rows(tmp_path / "r.csv")
    # A spreadsheet opening the CSV shows the name instead of computing 3.
    assert row["image"] == "'=1+2.jpg" and row["status"] != "error"


def test_a_fifo_named_on_the_command_line_does_not_hang(tmp_path: Path, model_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    out = tmp_path / "r.csv"
    command = [sys.executable, "-m", "retinagrade.cli", "grade", str(tmp_path / "pipe.jpg"), "-o", str(out)]
    command += ["--model", str(model_path), "-q"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120, capture_output=True)
    assert done.returncode == EXIT_FILE_ERRORS, done.stderr
    assert _rows(out)[0]["error_code"] == "not_a_file"


def test_ctrl_c_keeps_the_rows_that_finished(tmp_path: Path, photo: bytes, model_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "source.jpg").write_bytes(photo)
    for i in range(1500):  # links to one photo: a long run that costs no disk
        (folder / f"img{i:04d}.jpg").symlink_to(folder / "source.jpg")
    out = tmp_path / "r.csv"
    command = [sys.executable, "-m", "retinagrade.cli", "grade", str(folder), "-o", str(out), "-q"]
    command += ["--model", str(model_path)]
    # A shell without job control (CI runs the suite in the background) starts children with SIGINT ignored,
    # and Python then never installs its Ctrl-C handler: give the child the terminal's default, as a user has.
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or len(_rows(out)) < 10):
            time.sleep(0.05)
        seen = len(_rows(out))
        assert seen >= 10, "no rows appeared while the run was going"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=180)  # generous: CI machines are shared
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, stderr
    rows = _rows(out)
    assert seen <= len(rows) < 1501
    assert all(r["status"] in ("graded", "ungradable", "not_fundus") and r["quality"] for r in rows)
    assert b"Interrupted" in stderr


def test_an_unforeseen_failure_on_one_file_is_its_error_row_not_the_end_of_the_run(
    tmp_path: Path, photo: bytes, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the cluster engine: a file that trips a failure no input check foresaw gets an error row."""
    from retinagrade.pipeline import GradingPipeline

    prepare = GradingPipeline.prepare

    def tripping(self: GradingPipeline, data: bytes) -> object:
        if data.endswith(b"TRIP"):
            raise RecursionError("maximum recursion depth exceeded (PatientName Doe^John)")
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", tripping)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo)
    (folder / "b.jpg").write_bytes(photo + b"TRIP")
    (folder / "c.jpg").write_bytes(photo)
    out = tmp_path / "r.csv"
    code, output = _grade(folder, "-o", out, model=model_path)
    assert code == EXIT_FILE_ERRORS, output
    rows = {Path(r["image"]).name: r for r in _rows(out)}
    assert set(rows) == {"a.jpg", "b.jpg", "c.jpg"}
    assert rows["b.jpg"]["status"] == "error" and rows["b.jpg"]["error_code"] == "internal_error"
    assert rows["a.jpg"]["status"] != "error" and rows["c.jpg"]["status"] != "error"
    assert "Doe^John" not in output  # the exception's message is not echoed (it may quote the file)


@pytest.mark.parametrize("when", ["grading", "loading"])
@pytest.mark.parametrize("suffix", ["json", "fhir.json"])
def test_sigterm_keeps_a_complete_output_like_ctrl_c(
    tmp_path: Path, photo: bytes, model_path: Path, suffix: str, when: str
) -> None:
    """A scheduler's SIGTERM (or `kill`) ends the run as Ctrl-C does: the JSON array and the FHIR Bundle are
    closed, with every finished row, instead of a cut-off array or a 0-byte file; while the model loads too."""
    if suffix == "fhir.json":
        pytest.importorskip("fhir.resources", reason="needs the [dicom] extra (fhir.resources)")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "source.jpg").write_bytes(photo)
    for i in range(200):
        (folder / f"img{i:03d}.jpg").symlink_to(folder / "source.jpg")
    out = tmp_path / f"r.{suffix}"
    # The process sends itself SIGTERM when the tenth row is written, or as the model starts loading: no
    # timing to guess from outside.
    driver = (
        "import os, signal, sys\n"
        "from retinagrade import pipeline, report\n"
        "cls = report.writer_entry('fhir').factory if sys.argv[1].endswith('.fhir.json') else report.JsonWriter\n"
        "write, seen, load = cls.write, [], pipeline.GradingPipeline.load.__func__\n"
        "def counting(self, record):\n"
        "    write(self, record)\n"
        "    seen.append(record)\n"
        "    if len(seen) == 10:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "def loading(cls, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return load(cls, *args, **kwargs)\n"
        "cls.write = counting\n"
        f"if {when!r} == 'loading':\n"
        "    pipeline.GradingPipeline.load = classmethod(loading)\n"
        "from retinagrade.cli import app\n"
        "sys.argv = ['retinagrade', 'grade', *sys.argv[2:], '-o', sys.argv[1]]\n"
        "app()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, str(out), str(folder), "--model", str(model_path), "-q"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == EXIT_INTERRUPTED, done.stderr[-2000:]
    assert b"Interrupted" in done.stderr
    document = json.loads(out.read_text())
    if suffix == "json":
        rows = len(document)
    else:
        rows = len([e for e in document["entry"] if e["resource"]["resourceType"] == "Observation"])
    assert (10 <= rows < 201) if when == "grading" else rows == 0


def test_a_crash_mid_run_exits_3_and_keeps_the_rows_written(
    tmp_path: Path, photo: bytes, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retinagrade import report

    write = report.CsvWriter.write
    seen: list[object] = []

    def failing(self: report.CsvWriter, record: report.ResultRecord) -> None:
        if len(seen) == 2:
            raise RuntimeError("a defect in a writer")
        write(self, record)
        seen.append(record)

    monkeypatch.setattr(report.CsvWriter, "write", failing)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"img{i}.jpg").write_bytes(photo)
    out = tmp_path / "r.csv"
    code, output = _grade(folder, "-o", out, model=model_path)
    assert code == EXIT_RUN_FAILED, output
    assert "RuntimeError" in output and len(_rows(out)) == 2


@pytest.mark.parametrize("name", ["results.csv", "results.json", "out.fhir.json", "results.parquet"])
def test_the_ray_engine_refuses_an_output_that_names_a_file(tmp_path: Path, photo: bytes, name: str) -> None:
    (tmp_path / "eye.jpg").write_bytes(photo)
    target = tmp_path / name
    result = runner.invoke(app, ["grade", str(tmp_path / "eye.jpg"), "--engine", "ray", "--output", str(target)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert not target.exists()  # no folder named like a file
    stem = name.split(".")[0]
    assert f"--output{tmp_path / stem}/--csv" in "".join(result.output.split())  # whatever the terminal width


def test_a_worker_process_that_dies_fails_the_run_and_keeps_the_rows(
    tmp_path: Path, photo: bytes, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retinagrade.pipeline import GradingPipeline, PreparedRequest

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"a{i}.jpg").write_bytes(photo)
    (folder / "z.jpg").write_bytes(b"die")  # sorted last: the rows before it finish first
    prepare = GradingPipeline.prepare

    def dying(self: GradingPipeline, data: bytes) -> PreparedRequest:
        if data == b"die":
            os._exit(70)  # as the kernel's out-of-memory killer ends a process
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", dying)
    out = tmp_path / "r.csv"
    code, output = _grade(folder, "-o", out, "--workers", "2", model=model_path)
    assert code == EXIT_RUN_FAILED, output
    assert "worker process stopped" in " ".join(output.split())
    # The images in flight when the worker died are lost with it; every row before them stays, in order.
    written = [r["image"] for r in _rows(out)]
    assert written == [str(folder / f"a{i}.jpg") for i in range(len(written))]
    assert all(r["status"] in ("graded", "ungradable", "not_fundus") for r in _rows(out))
