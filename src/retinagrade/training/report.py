"""Write evaluation metrics as ``metrics.json`` (for machines) and ``metrics.md`` (for people).

The Markdown body comes from :func:`format_metrics_markdown`, which the model card reuses, so the numbers a
reader sees in the card and in an evaluation run are laid out the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.constants import GRADE_NAMES, REFERABLE_MIN_GRADE
from retinagrade.training.metrics import ECE_BINS

JSON_NAME = "metrics.json"
MARKDOWN_NAME = "metrics.md"


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from metrics: numpy scalars and arrays unwrapped, NaN and infinity as null.

    Raises:
        TypeError: for a value with no faithful JSON form, rather than writing its ``str()``.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        return [to_jsonable(item) for item in value]
    raise TypeError(f"cannot write a {type(value).__name__} to metrics.json")


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci_label(metrics: Mapping[str, Any]) -> str:
    level = float(metrics.get("ci_level", 0.95)) * 100
    return f"{level:.0f}% CI" if level == round(level) else f"{level:g}% CI"


def format_estimate(estimate: Mapping[str, Any] | None, ci_label: str = "95% CI", digits: int = 3) -> str:
    """``0.912 (95% CI 0.901-0.922)`` for an estimate dict; ``n/a`` when it is undefined."""
    if estimate is None or estimate.get("value") is None:
        return "n/a"
    value = _number(estimate["value"], digits)
    low, high = estimate.get("ci_low"), estimate.get("ci_high")
    if low is None or high is None:
        return value
    # A hyphen between two negative numbers would read as a minus sign.
    separator = "-" if low >= 0 else " to "
    return f"{value} ({ci_label} {_number(low, digits)}{separator}{_number(high, digits)})"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, Mapping | list | tuple):
        text = json.dumps(to_jsonable(value), separators=(", ", ": "))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "-") -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *[f"--{align}" for _ in header[1:]]]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def format_metrics_markdown(metrics: Mapping[str, Any], heading_level: int = 2) -> str:
    """Markdown tables for a dict from :func:`retinagrade.training.metrics.evaluate_predictions`.

    Args:
        metrics: the evaluation dict.
        heading_level: level of the section headings, so the text nests inside a larger document.

    Returns:
        Markdown with a summary, the referable decision, per-grade recall and precision, the confusion
        matrix with grade names, and any notes.
    """
    h = "#" * heading_level
    ci = _ci_label(metrics)
    bins = metrics.get("ece_bins", ECE_BINS)
    confusion = metrics["confusion_matrix"]
    if len(confusion) != len(GRADE_NAMES):
        raise ValueError(f"confusion matrix has {len(confusion)} rows, expected {len(GRADE_NAMES)}")
    images = str(metrics["n_images"])
    if metrics.get("n_groups") is not None:
        images += f" ({metrics['n_groups']} patient/duplicate groups)"

    lines = [f"{h} Summary", ""]
    lines += _table(
        ["Metric", "Value"],
        [
            ["Images", images],
            ["Quadratic weighted kappa", format_estimate(metrics["qwk"], ci)],
            ["Accuracy", _number(metrics["accuracy"])],
            [f"Top-label ECE ({bins} bins)", _number(metrics["top_label_ece"])],
        ],
    )

    referable = metrics["referable"]
    counts = referable["counts"]
    sensitivity = format_estimate(referable["sensitivity"], ci)
    specificity = format_estimate(referable["specificity"], ci)
    if referable["sensitivity"] is not None:
        sensitivity += f", {counts['tp']}/{counts['positives']}"
    if referable["specificity"] is not None:
        specificity += f", {counts['tn']}/{counts['negatives']}"
    lines += [
        "",
        f"{h} Referable DR (grade {REFERABLE_MIN_GRADE}, {GRADE_NAMES[REFERABLE_MIN_GRADE]}, or worse)",
        "",
    ]
    lines += _table(
        ["Metric", "Value"],
        [
            ["Threshold (refer when score >= threshold)", _number(referable["threshold"])],
            ["AUC", format_estimate(referable["auc"], ci)],
            ["Sensitivity", sensitivity],
            ["Specificity", specificity],
            [f"Referable ECE ({bins} bins)", _number(referable["ece"])],
            [
                "Referable / non-referable images",
                f"{counts['positives']} / {counts['negatives']}",
            ],
            ["TP / FN / TN / FP", f"{counts['tp']} / {counts['fn']} / {counts['tn']} / {counts['fp']}"],
        ],
    )

    lines += ["", f"{h} Per grade", ""]
    lines += _table(
        ["Grade", "Support", "Predicted", "Recall", "Precision"],
        [
            [
                f"{row['grade']} {row['name']}",
                str(row["support"]),
                str(row["predicted"]),
                _number(row["recall"]),
                _number(row["precision"]),
            ]
            for row in metrics["per_grade"]
        ],
        align=":",
    )

    labels = [f"{grade} {name}" for grade, name in enumerate(GRADE_NAMES)]
    lines += ["", f"{h} Confusion matrix", "", "Rows are reference grades, columns predicted grades.", ""]
    lines += _table(
        ["Reference \\ Predicted", *labels],
        [[label, *(str(count) for count in row)] for label, row in zip(labels, confusion, strict=True)],
        align=":",
    )

    methods = metrics.get("ci_method")
    notes = list(metrics.get("notes", []))
    if isinstance(methods, Mapping):
        notes.append(
            f"Intervals: kappa and AUC by {methods.get('qwk_auc')}; sensitivity and specificity by "
            f"{methods.get('sensitivity_specificity')} interval."
        )
    if notes:
        lines += ["", f"{h} Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_report(
    metrics: Mapping[str, Any], out_dir: Path, title: str, extra: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (created if needed).

    Args:
        metrics: the dict from :func:`retinagrade.training.metrics.evaluate_predictions`.
        out_dir: folder for the two files; existing files of the same names are replaced.
        title: heading of the Markdown report, also stored in the JSON.
        extra: run details to record beside the metrics (model, data split, thresholds, command line).

    Returns:
        Paths of the JSON and Markdown files. The JSON holds ``{"title", "metrics", "extra"}``, with NaN
        written as null so that any JSON parser reads it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = dict(extra or {})

    document = {"title": title, "metrics": to_jsonable(metrics), "extra": to_jsonable(run)}
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    lines = [f"# {title}", ""]
    if run:
        lines += [*_table(["Run detail", "Value"], [[_cell(k), _cell(v)] for k, v in run.items()]), ""]
    markdown = "\n".join(lines) + "\n" + format_metrics_markdown(metrics)
    md_path = out_dir / MARKDOWN_NAME
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path


def _percent_ci(estimate: Mapping[str, Any] | None) -> str:
    return format_estimate(estimate, "CI", 3)


def loso_rows(report: Mapping[str, Any], point: str | None = None) -> list[list[str]]:
    """One table row per held-out source of a leave-one-source-out report, at a named operating point."""
    rows = []
    table = report["by_point"][point] if point is not None and "by_point" in report else report["sources"]
    for name, metrics in table.items():
        referable = metrics["referable"]
        counts = referable["counts"]
        coarse = "coarse" in metrics
        sens, spec = referable.get("sensitivity"), referable.get("specificity")
        rows.append(
            [
                f"{name}" + (" (no DR vs PDR)" if coarse else ""),
                str(metrics["n_images"])
                + (f" (+{metrics['coarse']['images_with_grade_range']} NPDR)" if coarse else ""),
                _percent_ci(referable.get("auc")),
                "n/a" if coarse else _percent_ci(metrics.get("qwk")),
                f"{_percent_ci(sens)}, {counts['tp']}/{counts['positives']}" if sens else "n/a",
                f"{_percent_ci(spec)}, {counts['tn']}/{counts['negatives']}" if spec else "n/a",
                _number(referable.get("ece")),
                "n/a" if coarse else _number(metrics.get("top_label_ece")),
            ]
        )
    return rows


def recall_rows(table: Mapping[str, Any]) -> list[list[str]]:
    """Per-grade recall (and how many photos of each grade) per held-out source; n/a for an absent grade."""
    rows = []
    for name, metrics in table.items():
        cells = []
        for entry in metrics["per_grade"]:
            recall = entry["recall"]
            cells.append("n/a" if recall is None else f"{recall:.2f} ({entry['support']})")
        rows.append([name + (" (no DR vs PDR)" if "coarse" in metrics else ""), *cells])
    return rows


def _points(decision: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    section = decision.get("operating_points") or {}
    return str(section.get("default", "")), dict(section.get("points", {}))


def format_loso_markdown(
    report: Mapping[str, Any], heading_level: int = 2, title: str = "Leave one source out", intro: str | None = None
) -> str:
    """Markdown of a leave-one-source-out report: per held-out source at every named point, then the layer."""
    hashes = "#" * heading_level
    decision = report["decision"]
    default, points = _points(decision)
    header = [
        "held-out source",
        "images",
        "referable AUC",
        "QWK",
        "sensitivity",
        "specificity",
        "referable ECE",
        "top-label ECE",
    ]
    if intro is None:
        intro = (
            "Each row: a model trained on every other source (and on no image of a patient or photo group that the "
            "held-out source contains), tested on all of the held-out source. An eye is referred when its grade "
            "is 2 or worse or its calibrated P(grade >= 2) reaches the operating point's threshold"
        )
    lines = [f"{hashes} {title}", "", f"{intro}.", ""]
    for name, point in points.items() or {default: {"threshold": decision["referable_threshold"]}}.items():
        flag = " (default)" if name == default else ""
        lines += [
            f"{hashes}# Operating point `{name}`{flag}: refer at P(referable) >= {float(point['threshold']):.3f}",
            "",
        ]
        if point.get("description"):
            lines += [f"{point['description'][0].upper()}{point['description'][1:]}.", ""]
        lines += [*_table(header, loso_rows(report, name)), ""]
        if point.get("not_served"):
            lines += [f"Sources this point cannot serve at its targets: {', '.join(point['not_served'])}.", ""]
        setters = decision.get("point_sources")  # absent in older reports: every source set the point
        others = [source for source in report.get("by_point", {}).get(name, {}) if setters and source not in setters]
        if others:
            why = "not one of the calibration sources, the camera sets"
            lines += [f"Reported, not used to set this point ({why}): {', '.join(others)}.", ""]
    table = report["by_point"][default] if "by_point" in report else report["sources"]
    lines += [
        f"{hashes}# Per-grade recall (grade rule `{decision['rule']}`; photos of each grade in brackets)",
        "",
        *_table(["held-out source", *(f"grade {k}" for k in range(5))], recall_rows(table)),
        "",
        f"- Temperature {decision['temperature']:.3f}, operating points and grade rule chosen on "
        f"{decision['chosen_on']}.",
        f"- Grade rule `{decision['rule']}`"
        + (f", cut-points {[round(t, 3) for t in decision['thresholds']]}" if decision["rule"] != "argmax" else "")
        + (f"; {decision['why']}" if decision.get("why") else "")
        + ".",
    ]
    qwk_by_rule = decision.get("qwk_by_rule", {})
    if qwk_by_rule and all(isinstance(v, Mapping) for v in qwk_by_rule.values()):
        for rule, per_source in qwk_by_rule.items():
            cells = ", ".join(f"{k} {v:.3f}" for k, v in per_source.items())
            lines.append(f"- QWK of `{rule}` per held-out five-grade source: {cells}.")
    if decision.get("expected_grade_cut_points"):
        lines.append(
            f"- Cut-points on the expected grade (every band at least {decision.get('min_band_width')} wide): "
            f"{decision['expected_grade_cut_points']}, band widths {decision.get('band_widths')}."
        )
    lines += [
        "- Intervals: AUC and kappa by percentile bootstrap over patient/photo groups (1000 resamples); "
        "sensitivity and specificity by Wilson score.",
        "- Coarsely labelled sources (Mexico: no DR / NPDR / PDR) are scored on their exactly graded images "
        "(no DR and PDR); NPDR images (grade 1-3, referable status unknown) are left out of every metric.",
    ]
    seen = report.get("excluded_seen_by_init")
    if seen:
        counts = ", ".join(f"{k} {v}" for k, v in seen["images"].items())
        lines.append(
            f"- The starting model was trained on {', '.join(seen['init_sources'])}: those sources are not held out, "
            f"and images of their patients/photo groups are left out of the held-out sets ({counts} images)."
        )
    if report.get("wall_time_s"):
        lines.append(
            "- Wall time per held-out source (fit + predict, 2 CPU cores): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["wall_time_s"].items())
            + "."
        )
    return "\n".join(lines) + "\n"
