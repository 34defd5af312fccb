"""Report writer: metrics.json is valid JSON of the metrics, metrics.md a readable set of tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retinagrade.constants import GRADE_NAMES, NUM_GRADES
from retinagrade.training.metrics import OperatingPoint, evaluate_predictions, referable_probability, softmax
from retinagrade.training.report import format_estimate, format_metrics_markdown, write_report


def _metrics(seed: int = 0, n: int = 300, grades: tuple[int, ...] = tuple(range(NUM_GRADES))) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(grades), size=n)
    logits = rng.normal(0.0, 1.0, size=(n, NUM_GRADES))
    logits[np.arange(n), y] += 2.0
    probs = softmax(logits)
    return evaluate_predictions(
        y, probs, probs.argmax(axis=1), referable_probability(probs), referable_threshold=0.5, n_boot=50
    )


def test_format_estimate_writes_value_and_interval() -> None:
    kappa = {"value": 0.91234, "ci_low": 0.9011, "ci_high": 0.9222}
    assert format_estimate(kappa) == "0.912 (95% CI 0.901-0.922)"
    poor = {"value": -0.05, "ci_low": -0.1, "ci_high": 0.02}
    assert format_estimate(poor) == "-0.050 (95% CI -0.100 to 0.020)"
    assert format_estimate(kappa, ci_label="90% CI", digits=2) == "0.91 (90% CI 0.90-0.92)"
    assert format_estimate(None) == "n/a"


def test_write_report_writes_json_and_markdown_with_confusion_matrix(tmp_path: Path) -> None:
    metrics = _metrics()
    point = OperatingPoint(0.5, 0.93, 0.71, 0.9, True, "max_specificity")
    json_path, md_path = write_report(
        metrics, tmp_path / "eval", "Validation fold 0", extra={"model": "lite0", "operating_point": point}
    )

    document = json.loads(json_path.read_text(encoding="utf-8"))
    assert document["title"] == "Validation fold 0"
    assert document["metrics"]["confusion_matrix"] == metrics["confusion_matrix"]
    assert document["extra"]["operating_point"]["sensitivity"] == 0.93

    markdown = md_path.read_text(encoding="utf-8")
    assert markdown.startswith("# Validation fold 0\n")
    assert "lite0" in markdown
    qwk = metrics["qwk"]
    assert f"{qwk['value']:.3f} (95% CI {qwk['ci_low']:.3f}-{qwk['ci_high']:.3f})" in markdown
    # Every confusion-matrix row appears with its grade name and counts.
    for grade, (name, row) in enumerate(zip(GRADE_NAMES, metrics["confusion_matrix"], strict=True)):
        assert f"| {grade} {name} | " + " | ".join(str(c) for c in row) + " |" in markdown
    header = " | ".join(f"{grade} {name}" for grade, name in enumerate(GRADE_NAMES))
    assert f"| Reference \\ Predicted | {header} |" in markdown


def test_report_handles_undefined_metrics(tmp_path: Path) -> None:
    metrics = _metrics(seed=1, grades=(0, 1))  # no referable eyes: AUC and sensitivity undefined
    metrics["top_label_ece"] = float("nan")  # a NaN must not make invalid JSON
    json_path, md_path = write_report(metrics, tmp_path, "No referable eyes")
    document = json.loads(json_path.read_text(encoding="utf-8"))
    assert document["metrics"]["referable"]["auc"] is None
    assert document["metrics"]["top_label_ece"] is None
    markdown = md_path.read_text(encoding="utf-8")
    assert "| AUC | n/a |" in markdown
    assert "referable AUC is undefined" in markdown


def test_markdown_nests_under_a_larger_document() -> None:
    text = format_metrics_markdown(_metrics(seed=2), heading_level=3)
    assert "\n### Confusion matrix\n" in text and "\n## " not in text


def test_write_report_refuses_values_without_a_json_form(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metrics\.json"):
        write_report(_metrics(seed=3), tmp_path, "x", extra={"model": object()})


def test_the_cards_oedema_section_gives_the_threshold_the_flag_rates_and_what_oedema_referrals_cost() -> None:
    from retinagrade.training.card import dme_section

    rule = {
        "calibration": {"method": "platt", "scale": 0.8, "bias": -1.2, "fitted_on": "mexico-512"},
        "threshold": 0.4321,
        "rule": "lowest threshold at which at most 10% of every held-out source's grade 0-1 eyes are flagged",
        "fit_on": {"source": "mexico-512", "positives": 54, "negatives": 491,
                   "auc": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95}, "sensitivity": 0.7, "specificity": 0.9},
        "flag_rate_grade_0_1": {"eyepacs-768": 0.08},
        "with_oedema_referrals": {
            "balanced": {"eyepacs-768": {"sensitivity": 0.7, "specificity": 0.8, "specificity_dr_only": 0.84}},
            "sensitive": {"mexico-512": {"sensitivity": 1.0, "specificity": None, "specificity_dr_only": None}},
        },
    }  # fmt: skip
    rule["against_referable_risk"] = {
        "source": "mexico-512",
        "all": {"n": 545, "dme": 54, "dme_head": {"value": 0.93, "ci_low": 0.89, "ci_high": 0.97},
                "referable_risk": {"value": 0.96, "ci_low": 0.94, "ci_high": 0.98}},
        "eyes_with_dr": {"n": 147, "dme": 54, "dme_head": {"value": float("nan"), "ci_low": 0.0, "ci_high": 0.0},
                         "referable_risk": {"value": 0.8, "ci_low": 0.72, "ci_high": 0.87}},
    }  # fmt: skip
    text = dme_section(rule)
    assert "| all labelled | 545 (54) | 0.930 (0.890-0.970) | 0.960 (0.940-0.980) |" in text
    assert "| eyes with some DR | 147 (54) | n/a | 0.800 (0.720-0.870) |" in text
    assert "p_dme >= **0.4321**" in text and "| eyepacs-768 | 0.080 |" in text
    assert "| balanced | eyepacs-768 | 0.700 | 0.800 | 0.840 |" in text
    assert "| sensitive | mexico-512 | 1.000 | n/a | n/a |" in text
    # a rule written before the combined table existed still renders, without it
    del rule["with_oedema_referrals"]
    assert "specificity without oedema referrals" not in dme_section(rule)
