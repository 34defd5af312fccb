"""``retinagrade evaluate``: metrics of the shipped pipeline on labelled images, or of out-of-fold predictions.

Model evaluation runs exactly what users run (decode, crop, gate, ONNX model, decision). Images the gate
refuses are counted and reported, and metrics are computed on the graded ones, so a gate that refuses hard
cases cannot hide them: the refusal rate per true grade is part of the report.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.constants import NUM_GRADES
from retinagrade.errors import RetinagradeError
from retinagrade.inference.postprocess import GradeDecision
from retinagrade.training.data import Sample, read_labels
from retinagrade.training.metrics import evaluate_predictions
from retinagrade.training.report import format_metrics_markdown, write_report


def evaluate_oof(predictions_csv: Path, out: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Metrics of an ``oof_predictions.csv`` written by training, overall and per source."""
    with predictions_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{predictions_csv} has no rows")
    threshold = _threshold_from_run(predictions_csv)
    sections: dict[str, Any] = {}
    markdown = []
    for source in ["all", *sorted({r["source"] for r in rows})]:
        part = [r for r in rows if source == "all" or r["source"] == source]
        metrics = evaluate_predictions(
            np.array([int(r["grade_true"]) for r in part]),
            np.array([[float(r[f"p{k}"]) for k in range(NUM_GRADES)] for r in part]),
            np.array([int(r["grade_pred"]) for r in part]),
            np.array([float(r["p_referable"]) for r in part]),
            threshold,
            groups=np.array([r["group"] for r in part]),
            n_boot=n_boot,
        )
        sections[source] = metrics
        markdown.append(f"## Out-of-fold: {source}\n\n" + format_metrics_markdown(metrics, heading_level=3))
    write_report(
        sections["all"],
        out,
        f"Out-of-fold evaluation of {predictions_csv}",
        extra={"per_source": sections, "referable_threshold": threshold},
    )
    return {"metrics": sections, "markdown": "\n\n".join(markdown)}


def _threshold_from_run(predictions_csv: Path) -> float:
    """The operating point the training run chose, from the ``cv_metrics.json`` beside its predictions."""
    import json

    path = predictions_csv.parent / "cv_metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"no cv_metrics.json beside {predictions_csv} to read the operating point from")
    return float(json.loads(path.read_text())["decision"]["referable_threshold"])


def evaluate_model(
    labels: list[Path], model: Path | None, out: Path, workers: int = 2, threads: int = 2, n_boot: int = 1000
) -> dict[str, Any]:
    """Run the grading pipeline over labelled images and report metrics on those it graded.

    The results come from the same batch engine as ``retinagrade grade`` and are used as the typed
    :class:`~retinagrade.pipeline.GradeResult` s they are, at full precision (no door's rounded output).
    """
    from retinagrade.pipeline import GradingPipeline

    pipeline = GradingPipeline.load(model, threads=threads)
    samples = [s for path in labels for s in read_labels(path)]
    outcomes = [outcome for _, outcome in pipeline.grade_paths((s.path for s in samples), workers=workers)]
    statuses = Counter("error" if isinstance(o, RetinagradeError) else o.status for o in outcomes)
    graded: list[tuple[Sample, GradeDecision]] = []
    refused_by_grade = dict.fromkeys((str(g) for g in range(NUM_GRADES)), 0)
    for sample, outcome in zip(samples, outcomes, strict=True):
        decision = None if isinstance(outcome, RetinagradeError) else outcome.decision
        if decision is None:
            refused_by_grade[str(sample.grade)] += 1
        else:
            graded.append((sample, decision))
    if not graded:
        raise ValueError("the pipeline graded none of the images")
    metrics = evaluate_predictions(
        np.array([s.grade for s, _ in graded]),
        np.array([d.probabilities for _, d in graded]),
        np.array([d.grade for _, d in graded]),
        np.array([d.p_referable for _, d in graded]),
        pipeline.spec.referable_threshold,
        groups=np.array([s.group for s, _ in graded]),
        n_boot=n_boot,
        referred=np.array([d.referable for _, d in graded]),
    )
    extra = {
        "model": {"name": pipeline.spec.name, "version": pipeline.spec.version, "sha256": pipeline.spec.sha256},
        "data": [str(p) for p in labels],
        "statuses": dict(statuses),
        "not_graded_by_true_grade": refused_by_grade,
    }
    write_report(metrics, out, f"Evaluation of {pipeline.spec.name} {pipeline.spec.version}", extra=extra)
    md = format_metrics_markdown(metrics)
    md += f"\n\nStatuses: {dict(statuses)}; not graded, by true grade: {refused_by_grade}\n"
    return {"metrics": metrics, "extra": extra, "markdown": md}
