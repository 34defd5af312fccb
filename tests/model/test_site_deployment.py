"""A site's deployment on real photos: drift against a reference, calibrate, validate and grade with a profile."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retinagrade.api.telemetry import ServiceMetrics
from retinagrade.cli import app
from retinagrade.monitoring.drift import PSI_ALERT, DriftMonitor, build_reference
from retinagrade.training.validate_report import observation

runner = CliRunner()


def _rows(shared_data: Path, folder: str) -> list[dict[str, str]]:
    with (shared_data / folder / "labels.csv").open(newline="") as fh:
        return [{**row, "image": str(shared_data / folder / row["image"])} for row in csv.DictReader(fh)]


def _pick(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]


def _write_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "grade"])
        writer.writerows((row["image"], row["grade"]) for row in rows)
    return path


def test_photos_from_another_source_raise_the_drift_gauge_past_the_alert_level(
    grading_pipeline, shared_data: Path
) -> None:
    aptos = _pick([r for r in _rows(shared_data, "aptos2019-224") if r["conflicting_grades"] != "1"], 240, seed=0)
    eyepacs = _pick(_rows(shared_data, "eyepacs-256-graded"), 120, seed=0)

    def observations(rows: list[dict[str, str]]) -> list:
        outcomes = [o for _, o in grading_pipeline.grade_paths([Path(r["image"]) for r in rows])]
        return [o for o in map(observation, outcomes) if o is not None]

    reference = build_reference(observations(aptos[:120]))
    metrics = ServiceMetrics()
    for site, rows in (("like-reference", aptos[120:]), ("other-source", eyepacs)):
        monitor = DriftMonitor(reference, window=120, min_count=100)
        monitor.extend(observations(rows))
        metrics.observe_drift(site, monitor)

    def gauge(site: str, signal: str) -> float:
        value = metrics.registry.get_sample_value("retinagrade_drift_psi", {"site": site, "signal": signal})
        assert value is not None
        return value

    signals = ("p_referable", "quality", "ungradable", "not_fundus", "grade")
    same = {s: gauge("like-reference", s) for s in signals}
    other = {s: gauge("other-source", s) for s in signals}
    # A signal is NaN until the window holds enough of its images (P(referable): graded images only).
    assert np.isfinite(same["quality"]) and np.isfinite(other["quality"])
    assert np.nanmax(list(same.values())) < PSI_ALERT, same
    assert np.nanmax(list(other.values())) > PSI_ALERT, other


def test_the_alert_rule_fires_at_the_level_the_monitor_calls_a_shift() -> None:
    yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install -e '.[deploy]')")
    alerts = Path(__file__).resolve().parents[2] / "deploy/compose/prometheus/alerts.yml"
    rules = {r.get("alert"): r for g in yaml.safe_load(alerts.read_text())["groups"] for r in g["rules"]}
    level = re.search(r"retinagrade_drift_psi\)\s*>\s*([0-9.]+)", rules["RetinagradeInputDrift"]["expr"])
    assert level is not None and float(level.group(1)) == PSI_ALERT


def test_calibrate_refuses_a_small_sample(tmp_path: Path, shared_data: Path, model_path: Path) -> None:
    labels = _write_labels(tmp_path / "small.csv", _pick(_rows(shared_data, "aptos2019-224"), 30, seed=1))
    result = runner.invoke(
        app, ["calibrate", "--labels", str(labels), "--out", str(tmp_path / "site.json"), "--model", str(model_path)]
    )
    assert result.exit_code == 2, result.output
    assert "too small to calibrate" in result.output and "need at least 100" in result.output
    assert not (tmp_path / "site.json").exists()


def test_calibrate_then_validate_and_grade_with_the_site_profile(
    tmp_path: Path, shared_data: Path, model_path: Path
) -> None:
    rows = [r for r in _rows(shared_data, "aptos2019-224") if r["conflicting_grades"] != "1"]
    rng = np.random.default_rng(5)
    rng.shuffle(rows)
    referable = [r for r in rows if int(r["grade"]) >= 2]
    healthy = [r for r in rows if int(r["grade"]) < 2]
    calibration = _write_labels(tmp_path / "calibration.csv", referable[:50] + healthy[:80])
    check = _write_labels(tmp_path / "check.csv", referable[50:62] + healthy[80:98])
    site = tmp_path / "site.json"

    result = runner.invoke(
        app,
        [
            "calibrate",
            "--labels",
            str(calibration),
            "--out",
            str(site),
            "--name",
            "clinic-a",
            "--model",
            str(model_path),
        ],
    )
    assert result.exit_code == 0, result.output
    profile = json.loads(site.read_text())
    spec = json.loads(model_path.read_text())
    assert profile["name"] == "clinic-a" and profile["model"]["sha256"] == spec["sha256"]
    assert profile["sample"]["n_images"] == 130 and profile["sample"]["n_referable"] >= 20
    assert profile["metrics_after"]["referable"]["sensitivity"]["value"] is not None
    assert "Sensitivity" in result.output and "clinic-a" in result.output

    out = tmp_path / "report"
    result = runner.invoke(
        app, ["validate", "--labels", str(check), "--out", str(out), "--site", str(site), "--model", str(model_path)]
    )
    assert result.exit_code == 0, result.output
    assert "Site profile: clinic-a" in result.output
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3 and 'src="roc.png"' not in html
    markdown = (out / "report.md").read_text()
    assert "clinic-a" in markdown and "![ROC curve" in markdown and "Photos not graded, by local grade" in markdown
    for picture in ("roc.png", "reliability.png", "confusion.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "metrics.json").read_text())
    assert document["site"] == "clinic-a"
    assert document["operating_point"]["referable_threshold"] == pytest.approx(
        profile["parameters"]["referable_threshold"]
    )
    assert document["n_images"] == 30
    with (out / "predictions.csv").open(newline="") as fh:
        predictions = list(csv.DictReader(fh))
    assert len(predictions) == 30 and {p["site"] for p in predictions} == {"clinic-a"}

    graded = tmp_path / "graded.csv"
    images = [r["image"] for r in csv.DictReader(check.open())][:3]
    result = runner.invoke(
        app, ["grade", *images, "--site", str(site), "--model", str(model_path), "--output", str(graded), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    with graded.open(newline="") as fh:
        assert {row["site"] for row in csv.DictReader(fh)} == {"clinic-a"}


def test_grade_refuses_a_profile_made_for_another_model(
    tmp_path: Path, right_eye_photo: Path, model_path: Path
) -> None:
    from retinagrade.inference.site_profile import SiteProfile

    site = SiteProfile("old", "0" * 64, "2026-01-01", 1.0, 0.3).save(tmp_path / "old.json")
    photo = right_eye_photo
    result = runner.invoke(app, ["grade", str(photo), "--site", str(site), "--model", str(model_path)])
    assert result.exit_code == 3
    assert "fitted for model" in result.output
