"""``retinagrade grade --engine ray`` argument checks that need no cluster."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from retinagrade.cli import app

runner = CliRunner()


def test_the_ray_engine_needs_an_output_folder(tmp_path: Path) -> None:
    (tmp_path / "eye.jpg").write_bytes(b"x")
    result = runner.invoke(app, ["grade", str(tmp_path), "--engine", "ray"])
    assert result.exit_code == 2
    assert "--output FOLDER" in result.output


def test_the_ray_engine_refuses_a_file_as_output_folder(tmp_path: Path) -> None:
    (tmp_path / "eye.jpg").write_bytes(b"x")
    (tmp_path / "results.csv").write_text("")
    result = runner.invoke(
        app, ["grade", str(tmp_path / "eye.jpg"), "--engine", "ray", "-o", str(tmp_path / "results.csv")]
    )
    assert result.exit_code == 2
    assert "must be a folder" in " ".join(result.output.split())


def test_the_ray_engine_refuses_the_options_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "eye.jpg").write_bytes(b"x")
    for extra in (["--pair-eyes"], ["--output-sr", str(tmp_path / "sr")]):
        result = runner.invoke(app, ["grade", str(tmp_path), "--engine", "ray", "-o", str(tmp_path / "out"), *extra])
        assert result.exit_code == 2
        assert "takes neither" in " ".join(result.output.split())
