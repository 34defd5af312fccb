"""``retinagrade validate``: grade a site's labelled photos and write a report a clinical lead can read.

The photos go through exactly what the site will run (decode, crop, quality gate, model, the site profile's
operating point if one is given). Every number comes from :mod:`retinagrade.training.metrics` (the same
functions training and ``evaluate`` use); this module only lays them out: ``report.md`` and a self-contained
``report.html`` (pictures inlined), ``metrics.json``, ``predictions.csv`` and three PNG pictures (ROC curve
with the operating point, reliability diagram of P(referable), confusion matrix).

Metrics are computed on the photos the pipeline graded; the photos the gate refused are counted per true grade,
so a gate that refuses hard cases cannot hide them.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.constants import GRADE_NAMES, NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.errors import RetinagradeError
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.inference.site_profile import SiteProfile
from retinagrade.monitoring.drift import Observation
from retinagrade.pipeline import GradeResult
from retinagrade.training import metrics as m
from retinagrade.training.data import Sample
from retinagrade.training.report import format_estimate, format_metrics_markdown, to_jsonable

Outcome = GradeResult | RetinagradeError
REFUSAL_STATUSES = ("ungradable", "not_fundus", "error")
PICTURES = {"roc": "roc.png", "reliability": "reliability.png", "confusion": "confusion.png"}


# --------------------------------------------------------------------------------------------------------
# A graded local sample
# --------------------------------------------------------------------------------------------------------


def observation(outcome: Outcome) -> Observation | None:
    """What the drift watch keeps of one outcome; None for a file that never decoded."""
    return Observation.of(outcome) if isinstance(outcome, GradeResult) else None


@dataclass(frozen=True)
class GradedArrays:
    """The graded part of a local sample as arrays, for the metrics."""

    index: np.ndarray
    grades: np.ndarray
    probs: np.ndarray
    reported: np.ndarray
    p_referable: np.ndarray
    groups: np.ndarray
    #: The referral decision (grade 2+, or the risk at the operating point), as the pipeline made it.
    referred: np.ndarray


def graded_arrays(samples: Sequence[Sample], outcomes: Sequence[Outcome]) -> GradedArrays:
    keep = [i for i, o in enumerate(outcomes) if isinstance(o, GradeResult) and o.decision is not None]
    decisions = [d for i in keep if isinstance(o := outcomes[i], GradeResult) and (d := o.decision) is not None]
    return GradedArrays(
        index=np.array(keep, dtype=np.int64),
        grades=np.array([samples[i].grade for i in keep], dtype=np.int64),
        probs=np.array([d.probabilities for d in decisions], dtype=np.float64).reshape(-1, NUM_GRADES),
        reported=np.array([d.grade for d in decisions], dtype=np.int64),
        p_referable=np.array([d.p_referable for d in decisions], dtype=np.float64),
        groups=np.array([samples[i].group for i in keep]),
        referred=np.array([d.referable for d in decisions], dtype=bool),
    )


def status_of(outcome: Outcome) -> str:
    return outcome.status if isinstance(outcome, GradeResult) else "error"


def refusals_by_grade(samples: Sequence[Sample], outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Per true grade: images, how many were graded, and how many the pipeline refused and why."""
    rows = []
    for grade, name in enumerate(GRADE_NAMES):
        statuses = [status_of(o) for s, o in zip(samples, outcomes, strict=True) if s.grade == grade]
        refused = sum(s != "graded" for s in statuses)
        rows.append(
            {
                "grade": grade,
                "name": name,
                "images": len(statuses),
                "graded": len(statuses) - refused,
                **{status: statuses.count(status) for status in REFUSAL_STATUSES},
                "refused_rate": refused / len(statuses) if statuses else None,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------


def _figure(width: float = 4.6, height: float = 4.2) -> Any:
    # The object-oriented Figure API with the Agg canvas: no pyplot state, no display, safe in a server.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def draw_roc(path: Path, referable_true: np.ndarray, p_referable: np.ndarray, result: dict[str, Any]) -> None:
    from sklearn.metrics import roc_curve

    figure = _figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
    referable = result["referable"]
    if referable_true.any() and not referable_true.all():
        fpr, tpr, _ = roc_curve(referable_true, p_referable)
        auc = referable["auc"]
        ax.plot(fpr, tpr, color="#1f5fa8", lw=2, label=f"ROC, AUC {format_estimate(auc)}")
        sensitivity, specificity = referable["sensitivity"], referable["specificity"]
        if sensitivity is not None and specificity is not None:
            ax.plot(
                1 - specificity["value"],
                sensitivity["value"],
                "o",
                color="#c0392b",
                ms=8,
                label=f"operating point (P >= {referable['threshold']:.3f})",
            )
            ax.errorbar(
                1 - specificity["value"],
                sensitivity["value"],
                xerr=[[specificity["ci_high"] - specificity["value"]], [specificity["value"] - specificity["ci_low"]]],
                yerr=[[sensitivity["value"] - sensitivity["ci_low"]], [sensitivity["ci_high"] - sensitivity["value"]]],
                color="#c0392b",
                capsize=3,
                lw=1,
            )
    ax.set(
        xlabel="1 - specificity (healthy eyes referred)",
        ylabel="sensitivity (referable eyes referred)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="Referable DR: ROC curve",
    )
    ax.legend(loc="lower right", fontsize=7)
    figure.savefig(path)


def draw_reliability(path: Path, referable_true: np.ndarray, p_referable: np.ndarray, bins: int = 10) -> None:
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    index = np.clip((p_referable * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    predicted = np.bincount(index, weights=p_referable, minlength=bins)[filled] / counts[filled]
    observed = np.bincount(index, weights=referable_true.astype(float), minlength=bins)[filled] / counts[filled]
    ax.plot(predicted, observed, "o-", color="#1f5fa8", label="local photos")
    for x, y, n in zip(predicted, observed, counts[filled], strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="0.35")
    ax.set(
        xlabel="predicted P(referable), binned",
        ylabel="observed share referable",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability (numbers: photos per bin)",
    )
    ax.legend(loc="upper left", fontsize=7)
    figure.savefig(path)


def draw_confusion(path: Path, confusion: list[list[int]]) -> None:
    figure = _figure(5.2, 4.4)
    ax = figure.add_subplot()
    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(counts.astype(int)):
        ax.text(c, r, str(n), ha="center", va="center", color="white" if shares[r, c] > 0.5 else "black", fontsize=9)
    ticks = range(NUM_GRADES)
    ax.set_xticks(ticks, [str(g) for g in ticks])
    ax.set_yticks(ticks, [f"{g} {name}" for g, name in enumerate(GRADE_NAMES)], fontsize=7)
    ax.set(xlabel="predicted grade", ylabel="local reference grade", title="Confusion matrix (colour: row share)")
    figure.savefig(path)


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    metrics: dict[str, Any]
    markdown: str
    files: dict[str, Path]
    seconds: float


def _plain_summary(result: dict[str, Any], refusals: list[dict[str, Any]], n_images: int) -> list[str]:
    referable = result["referable"]
    counts = referable["counts"]
    lines = []
    if referable["sensitivity"] is not None:
        lines.append(
            f"- Of {counts['positives']} graded eyes with referable DR (grade {REFERABLE_MIN_GRADE} or worse), "
            f"{counts['tp']} were referred: sensitivity {format_estimate(referable['sensitivity'])}. "
            f"{counts['fn']} referable eyes were missed."
        )
    if referable["specificity"] is not None:
        lines.append(
            f"- Of {counts['negatives']} graded eyes without referable DR, {counts['tn']} were not referred: "
            f"specificity {format_estimate(referable['specificity'])}; {counts['fp']} were referred needlessly."
        )
    refused = sum(r["images"] - r["graded"] for r in refusals)
    referable_refused = sum(r["images"] - r["graded"] for r in refusals if r["grade"] >= REFERABLE_MIN_GRADE)
    lines.append(
        f"- {refused} of {n_images} photos ({refused / max(n_images, 1):.1%}) were not graded (ungradable, not a "
        f"fundus, or unreadable), {referable_refused} of them of referable eyes: the programme's recall rule for "
        "ungradable photos decides what happens to them."
    )
    lines.append(
        "- The intervals are 95% confidence intervals: with this many photos the true value at this site lies "
        "anywhere inside them. Read the lower end of sensitivity as the number the site can rely on."
    )
    return lines


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_html(markdown: str, title: str, pictures: dict[str, Path]) -> str:
    """A self-contained HTML page of the Markdown report: the PNG pictures are inlined as data URIs."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    for path in pictures.values():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body = body.replace(f'src="{path.name}"', f'src="data:image/png;base64,{data}"')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b;"
        "line-height:1.45}table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #c8c8c8;"
        "padding:.25rem .6rem;text-align:left}th{background:#eef2f7}img{max-width:32rem;margin:.5rem 1rem 0 0}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def write_validation_report(
    samples: Sequence[Sample],
    outcomes: Sequence[Outcome],
    spec: ModelSpec,
    out: Path,
    *,
    site: SiteProfile | None,
    labels: Sequence[Path],
    n_boot: int = 1000,
    grading_seconds: float | None = None,
) -> ValidationReport:
    """Compute the metrics of a graded local sample and write the report files into ``out``.

    Args:
        samples: the labelled photos, in the order of ``outcomes``.
        outcomes: what the pipeline answered for each.
        spec: the spec the photos were graded with (a site profile already applied).
        out: report folder (created).
        site: the profile that was applied, if any; the report names it.
        labels: the label files, for the record.
        n_boot: bootstrap resamples of the kappa and AUC intervals.
        grading_seconds: how long grading took, for the record.

    Raises:
        ValueError: the pipeline graded none of the photos.
    """
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    arrays = graded_arrays(samples, outcomes)
    if len(arrays.grades) == 0:
        raise ValueError("the pipeline graded none of the photos: nothing to measure (see predictions.csv)")
    result = m.evaluate_predictions(
        arrays.grades,
        arrays.probs,
        arrays.reported,
        arrays.p_referable,
        spec.referable_threshold,
        groups=arrays.groups,
        n_boot=n_boot,
        referred=arrays.referred,
    )
    refusals = refusals_by_grade(samples, outcomes)
    referable_true = m.is_referable(arrays.grades)

    files = {key: out / name for key, name in PICTURES.items()}
    draw_roc(files["roc"], referable_true, arrays.p_referable, result)
    draw_reliability(files["reliability"], referable_true, arrays.p_referable)
    draw_confusion(files["confusion"], result["confusion_matrix"])

    site_text = (
        f"{site.name} (fitted {site.created} on {site.sample.get('n_graded', '?')} graded photos)"
        if site is not None
        else "none: the model's global operating point"
    )
    title = f"Validation of {spec.name} {spec.version} on local photos"
    details = [
        ("Site profile", site_text),
        ("Model", f"{spec.name} {spec.version}, sha256 {spec.sha256[:16]}..."),
        ("Label files", ", ".join(str(p) for p in labels)),
        ("Photos", f"{len(samples)} ({len(arrays.grades)} graded)"),
        (
            "Operating point",
            f"{spec.operating_point}: refer at grade 2 or worse, or when P(referable) >= "
            f"{spec.referable_threshold:.3f}",
        ),
        ("Temperature", f"{spec.temperature:.3f}"),
        ("Written", datetime.now(UTC).isoformat(timespec="seconds")),
    ]
    lines = [f"# {title}", ""]
    lines += _markdown_table(["Run detail", "Value"], [(k, v.replace("|", "\\|")) for k, v in details])
    lines += ["", "## What this says", "", *_plain_summary(result, refusals, len(samples)), ""]
    lines += [format_metrics_markdown(result, heading_level=2)]
    lines += ["## Photos not graded, by local grade", ""]
    lines += _markdown_table(
        ["Grade", "Photos", "Graded", "Ungradable", "Not a fundus", "Unreadable", "Not graded"],
        [
            (
                f"{r['grade']} {r['name']}",
                str(r["images"]),
                str(r["graded"]),
                str(r["ungradable"]),
                str(r["not_fundus"]),
                str(r["error"]),
                "n/a" if r["refused_rate"] is None else f"{r['refused_rate']:.1%}",
            )
            for r in refusals
        ],
    )
    lines += [
        "",
        "## Pictures",
        "",
        f"![ROC curve with the operating point]({PICTURES['roc']}) "
        f"![Reliability diagram of P(referable)]({PICTURES['reliability']}) "
        f"![Confusion matrix]({PICTURES['confusion']})",
        "",
        "The ROC curve shows every threshold; the red point is the one in use, with its 95% intervals. In the "
        "reliability diagram a point under the diagonal means the model over-states the risk at that level, "
        "above it under-states it. Metrics: `metrics.json`; every photo's answer: `predictions.csv`.",
        "",
    ]
    markdown = "\n".join(lines)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(markdown, encoding="utf-8")
    files["html"] = out / "report.html"
    files["html"].write_text(
        render_html(markdown, title, {k: files[k] for k in PICTURES}),
        encoding="utf-8",
    )

    files["predictions"] = out / "predictions.csv"
    with files["predictions"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["image", "grade_true", "status", "grade", "referable", "p_referable", "quality", "site", "error"]
        )
        for sample, outcome in zip(samples, outcomes, strict=True):
            if isinstance(outcome, GradeResult):
                d = outcome.decision
                writer.writerow(
                    [
                        sample.path,
                        sample.grade,
                        outcome.status,
                        "" if d is None else d.grade,
                        "" if d is None else str(d.referable).lower(),
                        "" if d is None else round(d.p_referable, 5),
                        round(outcome.quality.score, 4),
                        site.name if site else "",
                        "",
                    ]
                )
            else:
                writer.writerow(
                    [sample.path, sample.grade, "error", "", "", "", "", site.name if site else "", outcome.code]
                )

    document = {
        "title": title,
        "site": None if site is None else site.name,
        "model": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
        "operating_point": {
            "name": spec.operating_point,
            "referable_threshold": spec.referable_threshold,
            "temperature": spec.temperature,
        },
        "labels": [str(p) for p in labels],
        "n_images": len(samples),
        "metrics": result,
        "not_graded_by_true_grade": refusals,
        "grading_seconds": grading_seconds,
    }
    files["json"] = out / "metrics.json"
    files["json"].write_text(json.dumps(to_jsonable(document), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return ValidationReport(result, markdown, files, time.perf_counter() - start)
