"""What the CLI prints reaches the tests whole, whatever the terminal's width or the length of the paths.

Rich wraps at the width of the terminal pytest was started from ($COLUMNS, else the terminal on stdin,
stdout or stderr, else 80) and folds a word longer than a line, so an assertion on a message that names a
temporary path would pass or fail by the depth of the checkout and the size of the window.
``tests/conftest.py`` announces a fixed, wide terminal for the session; these tests hold it to that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinagrade.cli import app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def long_path(tmp_path: Path) -> Path:
    """A folder about 400 characters deep, as a CI workspace or a nested checkout gives."""
    folder = tmp_path.joinpath(*[f"a-folder-with-a-rather-long-name-{n}" for n in range(10)])
    folder.mkdir(parents=True)
    return folder


def _existing_output(folder: Path) -> tuple[Path, Path]:
    photo = folder / "eye.jpg"
    photo.write_bytes(b"never read: the output is checked first")
    existing = folder / "results.csv"
    existing.write_text("image,status\n")
    return photo, existing


def test_an_error_naming_a_long_path_is_one_line(long_path: Path) -> None:
    photo, existing = _existing_output(long_path)
    result = CliRunner().invoke(app, ["grade", str(photo), "--output", str(existing)])
    assert result.exit_code == 2
    assert f"{existing} exists; pass --overwrite to replace it." in result.output.splitlines()


def test_the_results_table_shows_a_long_file_name_whole(long_path: Path, model_path: Path) -> None:
    name = "patient-0042-visit-2026-12-01-camera-3-left-eye-field-2.jpg"
    (long_path / name).write_bytes(b"%PDF-1.4 renamed")
    result = CliRunner().invoke(app, ["grade", str(long_path / name), "--model", str(model_path)])
    assert result.exit_code == 1, result.output  # not an image: an error row
    assert name in result.output


def test_a_cli_subprocess_prints_a_long_path_on_one_line(long_path: Path) -> None:
    photo, existing = _existing_output(long_path)
    command = [sys.executable, "-m", "retinagrade.cli", "grade", str(photo), "--output", str(existing)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{existing} exists; pass --overwrite to replace it." in done.stderr.splitlines()


def test_a_narrow_terminal_changes_nothing_but_pytests_own_report(tmp_path: Path) -> None:
    """The tests above, in a pytest started from a terminal that announces 50 columns."""
    env = {**os.environ, "COLUMNS": "50"}
    tests = [f"{Path(__file__).relative_to(REPO)}::{name}" for name in (
        "test_an_error_naming_a_long_path_is_one_line",
        "test_the_results_table_shows_a_long_file_name_whole",
        "test_a_cli_subprocess_prints_a_long_path_on_one_line",
    )]  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *tests]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 passed" in done.stdout
    separators = [line for line in done.stdout.splitlines() if line.startswith("=")]
    assert separators and max(len(line) for line in separators) <= 50, separators
