"""CLI checks of --site that need no model."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from retinagrade.cli import app


def test_site_with_the_ray_engine_is_refused_before_any_work(tmp_path: Path) -> None:
    site = tmp_path / "site.json"
    site.write_text("{}")
    result = CliRunner().invoke(
        app, ["grade", str(tmp_path), "--engine", "ray", "--output", str(tmp_path / "out"), "--site", str(site)]
    )
    assert result.exit_code == 2
    assert "--site is not supported with --engine ray" in result.output
    assert not (tmp_path / "out").exists()


def test_calibrate_reports_an_unreadable_label_file(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("name,score\na.jpg,1\n")
    result = CliRunner().invoke(app, ["calibrate", "--labels", str(labels), "--out", str(tmp_path / "site.json")])
    assert result.exit_code == 2
    assert "Cannot read the labels" in result.output and "unknown label layout" in result.output
