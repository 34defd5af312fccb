"""Write the model card (``models/README.md``) from the model spec, so the card cannot drift from the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinagrade.constants import GRADE_NAMES
from retinagrade.training.report import format_metrics_markdown

LIMITATIONS = """\
- Trained on small, low-resolution data: APTOS 2019 resized to 224 px and 660 EyePACS photos at up to 768 px.
  Production photos (2-12 MP) are brought to the same 224 px, contrast-normalised form, but subtle lesions
  (single microaneurysms) that need full resolution can be missed: mild DR (grade 1) recall is the weakest.
- Two populations (India, Aravind; USA, EyePACS) and their cameras. Performance on other populations, cameras,
  handheld or smartphone fundus photos is unknown until measured; validate locally before any clinical use.
- No diabetic macular oedema (DME) labels: the model does not assess DME, a common reason for referral.
- Ungradable images are refused by a quality gate fitted on EyePACS/EyeQ labels; its own error rates are in
  `docs/gate-report.md`.
- Labels are single-grader Kaggle labels with known noise (conflicting duplicates were resolved or dropped).
"""


def reproduce_command(cfg: dict[str, Any]) -> str:
    """The ``retinagrade train`` command line that re-creates a run from its resolved config."""
    parts = ["retinagrade train", *(f"--labels {path}" for path in cfg["labels"])]
    parts += [f"--arch {cfg['arch']}", f"--input-size {cfg['input_size']}", f"--frozen-stages {cfg['frozen_stages']}"]
    parts += [
        f"--views {cfg['views']}",
        f"--epochs {cfg['epochs']}",
        f"--folds {cfg['folds']}",
        f"--seed {cfg['seed']}",
    ]
    parts += [f"--oversample {name}={k}" for name, k in cfg.get("oversample", {}).items()]
    if cfg.get("cross_source"):
        parts.append("--cross-source")
    if not cfg.get("cache_features", True):
        parts.append("--no-cache")
    return " ".join(parts)


def render_card(spec: dict[str, Any], extra_sections: list[str] | None = None) -> str:
    metrics = spec.get("metrics", {})
    decision = metrics.get("decision", spec.get("decision", {}))
    referable = spec["referable"]
    data_rows = "\n".join(
        f"| {source} | {sum(counts)} | {' / '.join(str(c) for c in counts)} |"
        for source, counts in spec["training"]["data"].items()
    )
    cfg = spec["training"]["config"]
    parts = [
        f"# Model card: {spec['name']} {spec['version']}",
        "",
        "## Intended use",
        spec["intended_use"],
        "",
        "Input: one colour fundus photograph (JPEG, PNG, TIFF, BMP, WebP; any size). Output: ICDR grade 0-4 "
        f"({', '.join(GRADE_NAMES)}), calibrated probabilities, the referable decision (grade 2 or worse), "
        "a quality verdict, and a class-activation heatmap. Images that are not fundus photographs or cannot be "
        "graded get no grade.",
        "",
        "## Model",
        f"- Backbone: `{spec['architecture']['backbone']}` ({spec['architecture']['pretrained']}); "
        f"{spec['architecture']['trained_stages']}.",
        f"- Heads: {spec['architecture']['heads']}.",
        f"- Input: {spec['input']['size']} x {spec['input']['size']} px; "
        f"preprocessing `{json.dumps(spec['preprocess'])}`.",
        f"- Decision rule: `{spec['decision']['rule']}`, thresholds {spec['decision']['thresholds']}; out-of-fold "
        f"QWK by rule: {json.dumps(spec['decision'].get('qwk_by_rule_out_of_fold', {}))}.",
        f"- Calibration: temperature {spec['calibration']['temperature']:.3f} ({spec['calibration']['method']}).",
        f"- File: `{spec['model_file']}`, sha256 `{spec['sha256']}`.",
        "",
        "## Training data and its terms",
        "| source | images | grades 0 / 1 / 2 / 3 / 4 |",
        "|---|---|---|",
        data_rows,
        "",
        f"Training: {cfg['folds']}-fold cross-validation (stratified by grade, grouped by patient and "
        "duplicate group), "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}, "
        f"{cfg['views']} cached augmented views per image; then the same recipe on all images for the shipped weights.",
        "",
        f"Reproduce: `{reproduce_command(cfg)}`.",
        "",
        "**Licence of the weights.** APTOS 2019 and EyePACS are Kaggle competition data for research and "
        "non-commercial use; these weights are derived from them and inherit that restriction. The code is "
        "Apache-2.0.",
        "",
        "## Operating point",
        f"Referable when calibrated P(grade >= 2) >= **{referable['threshold']:.4f}**, chosen as the "
        f"{referable['chosen']} (out of fold).",
        "",
        "## Measured performance (out-of-fold, all images)",
        format_metrics_markdown(metrics["all"], heading_level=3) if "all" in metrics else "not measured",
    ]
    for source, section in metrics.items():
        if source in ("all", "decision", "cross_source", "source_ablation") or not isinstance(section, dict):
            continue
        parts += ["", f"## Out-of-fold on {source}", format_metrics_markdown(section, heading_level=3)]
    if "cross_source" in metrics:
        parts += [
            "",
            "## Cross-source: trained on one source only, tested on every image of the other",
            "",
            "| trained on -> tested on | images | referable AUC | QWK (most probable grade) |",
            "|---|---|---|---|",
        ]
        for pair, m in metrics["cross_source"].items():
            auc = "n/a" if m["referable_auc"] is None else f"{m['referable_auc']:.3f}"
            parts.append(f"| {pair} | {m['n']} | {auc} | {m['qwk_argmax']:.3f} |")
    gate = spec.get("gate_meta")
    if gate:
        parts += [
            "",
            "## Quality gate",
            f"Fitted on {gate.get('fitted_on')}; out-of-fold ungradable-vs-gradable AUC {gate.get('eyeq_oof_auc')} "
            f"(95% CI {gate.get('eyeq_oof_auc_ci95')}); split {gate.get('split')}. Details: `docs/gate-report.md`.",
        ]
    ood = spec.get("ood", {})
    parts += [
        "",
        "## Out-of-distribution check",
        "Not-a-fundus photos are refused by the quality gate's rules. The embedding distance to the training "
        "images is recorded in the spec but "
        + (
            f"refuses photos above {ood['distance_limit']}."
            if "distance_limit" in ood
            else "is not used for decisions: measured on this model it did not separate non-fundus images from "
            "fundus photos of other cameras."
        ),
    ]
    for section in extra_sections or []:
        parts += ["", section]
    parts += [
        "",
        "## Limitations",
        LIMITATIONS,
        f"Decision rule chosen out of fold: {json.dumps(decision, default=str)}",
    ]
    return "\n".join(parts) + "\n"


def write_card(spec_path: Path, out: Path, extra: list[Path] | None = None) -> Path:
    spec = json.loads(spec_path.read_text())
    sections = [p.read_text() for p in extra or []]
    out.write_text(render_card(spec, sections))
    return out
