"""``retinagrade grade`` never loses work (issue 8 C): odd names, odd files, interruptions, existing outputs."""

from __future__ import annotations

import csv
import io
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
