"""Leave-one-source-out runs made separately, joined into one held-out table and one decision layer.

A LOSO fit per held-out source runs as its own process (``retinagrade train --loso SOURCE --no-final
--threads 1``), so several run side by side on a small machine. Each run folder keeps its held-out outputs
(``loso_logits.npz``: logits, regression and the ``held`` mask over every sample of its label files, in
order). :func:`join_runs` puts them together: a sample held out by one run takes that run's outputs; a sample
held out by several (runs of other seeds or recipes on the same source) takes the mean of their outputs, which
is how an ensemble of tails on one shared stem scores on LOSO. The decision layer is then fitted once on the
joined table (:func:`retinagrade.training.train.loso_report`), and may be written into a model's spec.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import numpy as np

from retinagrade.inference.model_spec import FellowEyeRule, ModelSpec, OperatingPoint, dme_rule_of
from retinagrade.training.data import read_sources
from retinagrade.training.decisions import decision_of
from retinagrade.training.ensemble import average_held_out
from retinagrade.training.train import CAMERA_SOURCES, Inputs, Predictions, loso_report, with_dme_negatives

#: What the spec keeps of how the grade rule was chosen.
_RULE_KEYS = ("min_band_width", "band_widths", "why", "expected_grade_cut_points")


@dataclass(frozen=True)
class JoinedRuns:
    """Held-out outputs of several LOSO runs over the same label files.

    Attributes:
        inputs: the samples (no images or features: enough to score and report).
        predictions: per sample, the mean held-out outputs of the runs that held it out.
        held: which samples some run held out.
        votes: how many runs held each sample out (2 or more: an ensemble).
        holdout: the held-out sources, in the order first seen.
        runs: the run folders.
    """

    inputs: Inputs
    predictions: Predictions
    held: np.ndarray
    votes: np.ndarray
    holdout: list[str]
    runs: list[Path]


def _labels_of(run: Path) -> tuple[list[str], list[str]]:
    """The label files a run read (its ``labels`` and the ``optional_labels`` present, as training reads them)
    and the sources whose grade-0 photos it took as DME negatives."""
    config = json.loads((run / "train_config.json").read_text())
    optional = [str(p) for p in config.get("optional_labels") or [] if Path(p).is_file()]
    return [*(str(p) for p in config["labels"]), *optional], [str(s) for s in config.get("dme_negative_sources") or []]


def join_runs(runs: Sequence[Path]) -> JoinedRuns:
    """Join the held-out outputs of LOSO run folders that read the same label files.

    Raises:
        ValueError: no run, a run without ``loso_logits.npz``, or runs over different label files.
    """
    if not runs:
        raise ValueError("no LOSO run folders given")
    labels = _labels_of(runs[0])
    for run in runs[1:]:
        if _labels_of(run) != labels:
            raise ValueError(f"{run} read other label files than {runs[0]}: their held-out tables cannot be joined")
    for run in runs:
        if not (run / "loso_logits.npz").is_file():
            raise ValueError(f"{run} has no loso_logits.npz (not a LOSO run, or it has not finished a source)")
    files, dme_negatives = labels
    samples = with_dme_negatives(read_sources(files), dme_negatives)
    arrays = average_held_out(list(runs))
    n = len(samples)
    if len(arrays["held"]) != n:
        raise ValueError(f"{runs[0]} holds {len(arrays['held'])} samples, the label files {n}")
    held = arrays["held"].astype(bool)
    sources = np.array([s.source for s in samples])
    holdout = list(dict.fromkeys(sources[held].tolist()))
    low = np.array([s.grade_bounds[0] for s in samples])
    high = np.array([s.grade_bounds[1] for s in samples])
    # Scoring needs samples and grade bounds only, never the images: there is no feed.
    inputs = Inputs(samples, low, high, cast("Any", None))
    predictions = Predictions(
        arrays["logits"].astype(np.float32),
        arrays["regression"].astype(np.float32),
        np.zeros((n, 1), np.float32),
        arrays["logit_dme"].astype(np.float32) if "logit_dme" in arrays else None,
    )
    return JoinedRuns(inputs, predictions, held, arrays["n_models"], holdout, list(runs))


def calibration_sources_of(run: Path) -> list[str]:
    """The camera sources a run's configuration names to set the temperature and operating points."""
    config = json.loads((run / "train_config.json").read_text())
    return [str(name) for name in config.get("calibration_sources") or CAMERA_SOURCES]


def report_runs(runs: Sequence[Path], out_dir: Path, point_sources: Sequence[str] | None = None) -> dict[str, Any]:
    """Join runs, fit the decision layer on the joined held-out table and write loso.json/.md/predictions.

    ``point_sources`` (default: the first run's ``calibration_sources``) set the temperature and the operating
    points; every held-out source is reported.
    """
    joined = join_runs(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(point_sources) if point_sources else calibration_sources_of(runs[0])
    report = loso_report(joined.inputs, joined.predictions, joined.held, joined.holdout, None, out_dir, chosen)
    report["runs"] = [str(run) for run in runs]  # all over the same label files (join_runs checks)
    report["ensemble_size"] = {
        name: int(joined.votes[(joined.inputs.sources == name) & joined.held].max()) for name in joined.holdout
    }
    (out_dir / "loso.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def spec_with_layer(spec: ModelSpec, report: dict[str, Any], fellow_eye: dict[str, Any] | None) -> ModelSpec:
    """The spec of the same ONNX model with the decision layer of a LOSO report (nothing else changes).

    The temperature, grade rule, named operating points and their per-source held-out numbers, the LOSO
    metrics and (when given) the fellow-eye rule refitted at the new temperature are replaced.
    """
    layer = report["decision"]
    points_section = layer["operating_points"]
    default = str(points_section["default"])
    points = {
        name: OperatingPoint(name, float(point["threshold"]), str(point.get("description", "")))
        for name, point in points_section["points"].items()
    }
    raw = json.loads(json.dumps(spec.raw, default=float))
    raw["calibration"] = {
        **raw.get("calibration", {}),
        "method": f"temperature scaling on {layer['chosen_on']}",
        "temperature": layer["temperature"],
    }
    raw["decision"] = {
        "qwk_by_rule_held_out": layer.get("qwk_by_rule", {}),
        **{
            str(k): layer[k]
            for k in ("min_band_width", "band_widths", "why", "expected_grade_cut_points")
            if k in layer
        },
    }
    default_point = points_section["points"][default]
    raw["referable"] = {
        "score": "calibrated P(grade >= 2)",
        "rule": "referred when the grade is 2 or worse, or when P(grade >= 2) reaches the operating point",
        "chosen": f"{default}: {default_point.get('description', '')}",
        "per_source_held_out": default_point.get("per_source", {}),
        "min_grade": spec.referable_min_grade,
    }
    raw["operating_points"] = points_section
    metrics = dict(raw.get("metrics", {}))
    metrics["loso"] = {k: v for k, v in report.items() if k not in ("runs",)}
    metrics["decision"] = layer
    raw["metrics"] = metrics
    if fellow_eye is not None:
        raw["fellow_eye"] = fellow_eye
    else:
        raw.pop("fellow_eye", None)
    dme_section = report.get("dme")
    if dme_section and "dme" not in spec.outputs:
        raise ValueError("the LOSO runs have a DME output, the model being written has none")
    if dme_section:
        raw["dme"] = dme_section
    else:
        raw.pop("dme", None)
    return dataclasses.replace(
        spec,
        temperature=float(layer["temperature"]),
        decision=decision_of(layer),
        referable_threshold=points[default].threshold,
        operating_point=default,
        operating_points=MappingProxyType(points),
        raw=raw,
        fellow_eye=(
            FellowEyeRule(float(fellow_eye["weight"]), float(fellow_eye["referable_threshold"])) if fellow_eye else None
        ),
        dme=dme_rule_of(dme_section),
    )


def write_layer_into_spec(
    spec_path: Path, report: dict[str, Any], predictions: Path, min_sensitivity: float = 0.90
) -> ModelSpec:
    """Rewrite a spec file with a LOSO report's decision layer (the ONNX file and its sha256 unchanged).

    The fellow-eye rule is chosen again on the joined held-out predictions at the new temperature.
    """
    from retinagrade.training import fellow_eye

    spec = ModelSpec.load(spec_path)
    temperature = float(report["decision"]["temperature"])
    rule = fellow_eye.choose_rule(
        fellow_eye.Paired.read(predictions), temperature, list(report["holdout"]), min_sensitivity
    )
    updated = spec_with_layer(spec, report, rule)
    spec_path.write_text(json.dumps(updated.to_dict(), indent=2) + "\n", encoding="utf-8")
    return ModelSpec.load(spec_path)
