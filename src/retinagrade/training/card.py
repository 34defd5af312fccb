"""Write the model card (``models/README.md``) from the model spec, so the card cannot drift from the model.

Leave-one-source-out results come first: they are what a user with a camera the model never saw should
expect. In-domain (cross-validation) numbers follow when the run has them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retinagrade.constants import GRADE_NAMES
from retinagrade.training.report import format_loso_markdown, format_metrics_markdown

LIMITATIONS = """\
- Trained on small, low-resolution data (224-768 px copies). Production photos (2-12 MP) are brought to the
  same contrast-normalised form at the model's input size, but subtle lesions (single microaneurysms) that need
  full resolution can be missed: mild DR (grade 1) recall is the weakest.
- Populations: India (APTOS, Aravind), USA (EyePACS), Mexico (three institutes). Performance on other
  populations, cameras, handheld or smartphone fundus photos is unknown until measured; leave-one-source-out
  numbers above are the best guide, and they are far from in-domain numbers. Validate locally before any
  clinical use.
- Where the model ranks poorly (US EyePACS camera photos, referable AUC about 0.80 held out) no single threshold
  gives both high sensitivity and high specificity: the default point there trades sensitivity for specificity,
  and `sensitive` refers most healthy eyes. The operating-point tables name the sources each point cannot serve.
  Calibrate on local graded photos (`retinagrade calibrate`) before routine use.
- The grade is the model's own estimate (never rewritten to match the referral); an eye referred on risk alone
  says so (`referral_reason: risk`). Mild DR (grade 1) is rarely recognised as such.
{dme}
- Ungradable images are refused by a quality gate fitted on EyePACS/EyeQ labels; its own error rates are in
  `docs/gate-report.md`.
- Labels are single-grader Kaggle labels with known noise (conflicting duplicates were resolved or dropped);
  Mexico's labels are coarse (no DR / NPDR / PDR) and given per patient, so an NPDR patient's other eye may be
  healthy.
"""

_NO_DME_LIMITATION = (
    "- No diabetic macular oedema (DME) labels are used: the model does not assess DME, a common reason for referral."
)
_DME_LIMITATION = (
    "- Macular oedema (DME) was learned from the Mexican photos alone, whose oedema labels follow a collection "
    "batch; it is measured on the one held-out set with both classes, whose oedema eyes all have DR. The table "
    "in the DME section says whether the head ranks oedema better than the referable-DR risk does: where it "
    "does not, `dme` is a prompt to look at the macula, not a finding."
)

_TERMS_BY_FAMILY = {
    "aptos2019": "| APTOS 2019 (Kaggle) | competition data: research and non-commercial use only |",
    "eyepacs": "| EyePACS (Kaggle 2015) | competition data: research and non-commercial use only |",
    "odir": "| ODIR-5K (via a Kaggle redistribution, 400 px) | ODIR-5K terms: research and non-commercial use only |",
    "mexico": "| Mexico (mexico-512, mexico-dme) | no licence stated; research use; citation requested: Hughes Cano, "
    'Olivares Pinto & Thebault, "Dataset of Eye Fundus and OCT Images for the study of Diabetic Macular Edema and '
    'Diabetic Retinopathy" |',
}


def terms(sources: list[str]) -> str:
    """The terms table for the data a model was trained on, and what they mean for the weights."""
    from retinagrade.training.data import family

    rows = [_TERMS_BY_FAMILY.get(family(s), f"| {s} | see its README |") for s in sources]
    rows.append("| EyeQ quality labels (quality gate only) | CC BY-NC-SA 4.0 (Fu et al., MICCAI 2019) |")
    return "\n".join(
        [
            "| source | terms |",
            "|---|---|",
            *dict.fromkeys(rows),
            "",
            "**Licence of the weights.** The weights are derived from these data and inherit their restrictions: "
            "research and non-commercial use only. The code is Apache-2.0.",
            "",
        ]
    )


def reproduce_command(cfg: dict[str, Any]) -> str:
    """The ``retinagrade train`` command line that re-creates a run from its resolved config."""
    parts = ["retinagrade train", *(f"--labels {path}" for path in cfg["labels"])]
    parts += [f"--arch {cfg['arch']}", f"--input-size {cfg['input_size']}", f"--frozen-stages {cfg['frozen_stages']}"]
    if cfg.get("cache_stages") is not None:
        parts += [f"--cache-stages {cfg['cache_stages']}"]
    if cfg.get("init_from"):
        parts += [f"--init-from {cfg['init_from']}"]
    if cfg.get("heads_only"):
        parts += ["--heads-only"]
    parts += [f"--views {cfg['views']}"]
    if cfg.get("artefact_views"):
        parts += [f"--artefact-views {cfg['artefact_views']}"]
    if cfg.get("train_views", "all") != "all":
        parts += [f"--train-views {cfg['train_views']}"]
    parts += [
        f"--epochs {cfg['epochs']}",
        f"--batch-size {cfg['batch_size']}",
        f"--lr {cfg['lr']}",
        f"--folds {cfg['folds']}",
        f"--seed {cfg['seed']}",
    ]
    if cfg.get("source_balance"):
        parts.append(f"--source-balance {cfg['source_balance']}")
    parts += [f"--oversample {name}={k}" for name, k in cfg.get("oversample", {}).items()]
    parts += [f"--loso {name}" for name in cfg.get("loso", [])]
    if cfg.get("cross_source"):
        parts.append("--cross-source")
    if not cfg.get("cache_features", True):
        parts.append("--no-cache")
    return " ".join(parts)


def _recipe(cfg: dict[str, Any]) -> str:
    views = f"{cfg['views']} standard"
    if cfg.get("artefact_views"):
        views += f" + {cfg['artefact_views']} camera-artefact"
    balance = (
        f"; source-balanced sampling (a source's share of each epoch proportional to n^{1 - cfg['source_balance']:g})"
        if cfg.get("source_balance")
        else ""
    )
    evaluation = []
    if cfg.get("loso"):
        evaluation.append(f"leave-one-source-out on {', '.join(cfg['loso'])}")
    if cfg.get("folds", 0) > 1:
        evaluation.append(f"{cfg['folds']}-fold cross-validation grouped by patient and duplicate group")
    return (
        f"{' and '.join(evaluation) or 'no held-out evaluation'}; {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}, label smoothing {cfg['label_smoothing']}, "
        f"dropout {cfg['dropout']}; cached stem features of the clean image + {views} augmented views per image "
        f"(training draws `{cfg.get('train_views', 'all')}` views){balance}; coarse labels (a grade range) trained "
        "with the partial-label loss -log P(allowed grades); then the same recipe on all images for the shipped "
        "weights."
    )


def _cv_sections(cv: dict[str, Any]) -> list[str]:
    """In-domain cross-validation sections: all images, each source, and the cross-source table."""
    parts: list[str] = []
    if "all" in cv:
        parts += ["", "## In-domain cross-validation (out-of-fold, all images)", format_metrics_markdown(cv["all"], 3)]
        for source, section in cv.items():
            if source in ("all", "decision", "cross_source") or not isinstance(section, dict):
                continue
            parts += ["", f"## Out-of-fold on {source}", format_metrics_markdown(section, heading_level=3)]
    if "cross_source" in cv:
        parts += [
            "",
            "## Cross-source: trained on one source only, tested on every image of the other",
            "",
            "| trained on -> tested on | images | referable AUC | QWK (most probable grade) |",
            "|---|---|---|---|",
        ]
        for pair, m in cv["cross_source"].items():
            auc = "n/a" if m["referable_auc"] is None else f"{m['referable_auc']:.3f}"
            parts.append(f"| {pair} | {m['n']} | {auc} | {m['qwk_argmax']:.3f} |")
    return parts


def render_card(
    spec: dict[str, Any], extra_sections: list[str] | None = None, lead_sections: list[str] | None = None
) -> str:
    """The card's Markdown; ``lead_sections`` (e.g. results on unseen sources) go right after the intended use."""
    metrics = spec.get("metrics", {})
    decision = metrics.get("decision", spec.get("decision", {}))
    ranges = spec["training"].get("grade_ranges", {})
    data_rows = "\n".join(
        f"| {source} | {sum(counts) + ranges.get(source, 0)} | {' / '.join(str(c) for c in counts)}"
        + (f" (+{ranges[source]} NPDR, grade 1-3)" if source in ranges else "")
        + " |"
        for source, counts in spec["training"]["data"].items()
    )
    cfg = spec["training"]["config"]
    qwk_by_rule = spec["decision"].get("qwk_by_rule_held_out", spec["decision"].get("qwk_by_rule_out_of_fold", {}))
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
    ]
    if "loso" in metrics:
        parts += [format_loso_markdown(metrics["loso"], heading_level=2)]
    for section in lead_sections or []:
        parts += [section, ""]
    parts += [
        "## Model",
        f"- Backbone: `{spec['architecture']['backbone']}` ({spec['architecture']['pretrained']}); "
        f"{spec['architecture']['trained_stages']}.",
        f"- Heads: {spec['architecture']['heads']}.",
        f"- Input: {spec['input']['size']} x {spec['input']['size']} px; "
        f"preprocessing `{json.dumps(spec['preprocess'])}`.",
        f"- Decision rule: `{spec['decision']['rule']}`, thresholds {spec['decision']['thresholds']}; held-out "
        f"QWK by rule: {json.dumps(qwk_by_rule)}.",
        f"- Calibration: temperature {spec['calibration']['temperature']:.3f} ({spec['calibration']['method']}).",
        f"- File: `{spec['model_file']}`, sha256 `{spec['sha256']}`.",
        "",
        "## Training data and its terms",
        "| source | images | exact grades 0 / 1 / 2 / 3 / 4 |",
        "|---|---|---|",
        data_rows,
        "",
        "Groups that never straddle a split: patient across all EyePACS folders (the same photo can be in two "
        "folders at two resolutions), `split_group` in Mexico, duplicate group in APTOS.",
        "",
        terms(list(spec["training"]["data"])),
        f"Training: {_recipe(cfg)}",
        "",
        f"Reproduce: `{reproduce_command(cfg)}`.",
        "",
        *operating_points_section(spec),
    ]
    if spec.get("dme"):
        parts += ["", dme_section(spec["dme"])]
    if spec.get("fellow_eye"):
        parts += ["", fellow_eye_section(spec["fellow_eye"])]
    if "loso" in metrics:
        for source, section in metrics["loso"]["sources"].items():
            parts += ["", f"## Held out: {source} (leave one source out)", format_metrics_markdown(section, 3)]
    # Specs written before LOSO kept the cross-validation results at the top of "metrics".
    parts += _cv_sections(metrics.get("cv") or (metrics if "all" in metrics else {}))
    gate = spec.get("gate_meta")
    if gate:
        parts += ["", gate_section(gate)]
    for section in extra_sections or []:
        parts += ["", section]
    parts += [
        "",
        "## Limitations",
        LIMITATIONS.format(dme=_DME_LIMITATION if spec.get("dme") else _NO_DME_LIMITATION),
        f"Decision chosen on held-out predictions: {json.dumps(decision, default=str)}",
    ]
    return "\n".join(parts) + "\n"


def operating_points_section(spec: dict[str, Any]) -> list[str]:
    """The card's operating points: the referral rule, then one row per named point (default first)."""
    referable = spec["referable"]
    section = spec.get("operating_points")
    lines = ["## Operating points"]
    if not section:
        return [*lines, f"Referable when calibrated P(grade >= 2) >= **{referable['threshold']:.4f}**."]
    default = section["default"]
    lines += [
        "An eye is referred when its grade is 2 (moderate NPDR) or worse, or, with a grade 0-1, when its calibrated "
        "P(grade >= 2) reaches the operating point's threshold; the answer then says `referral_reason: risk` and "
        "keeps the grade the model believes. P(referable) is calibrated on the held-out camera sources (referable "
        "ECE in the tables above), so a threshold means about the same risk on every camera; what differs between "
        "cameras is how well the model ranks. Choose a "
        f"point with `--operating-point`, `RETINAGRADE_OPERATING_POINT` or `X-Retinagrade-Operating-Point`; "
        f"default **{default}**.",
        "",
        "| point | refer at risk >= | what it asks | held-out sources it serves | sources it cannot serve |",
        "|---|---|---|---|---|",
    ]
    ordered = sorted(section["points"].items(), key=lambda item: item[0] != default)
    for name, point in ordered:
        lines.append(
            f"| {name}{' (default)' if name == default else ''} | {float(point['threshold']):.4f} | "
            f"{point.get('description', '')} | {', '.join(point.get('served', [])) or 'none'} | "
            f"{', '.join(point.get('not_served', [])) or 'none'} |"
        )
    lines += ["", "Per-source sensitivity and specificity of each point: the leave-one-source-out tables above."]
    return lines


def dme_section(rule: dict[str, Any]) -> str:
    """The card's macular-oedema section, from the DME rule fitted on held-out predictions."""
    fit = rule.get("fit_on", {})
    auc = fit.get("auc") or {}

    def num(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) else "n/a"

    lines = [
        "## Diabetic macular oedema (DME)",
        "A second head on the same network gives a DME logit; `p_dme` is its Platt-scaled probability (scale "
        f"{rule['calibration']['scale']:.3f}, bias {rule['calibration']['bias']:.3f}, fitted on the held-out "
        f"photos of {fit.get('source', 'n/a')}), and `dme` is true at p_dme >= **{rule['threshold']:.4f}**: "
        f"{rule.get('rule', '')}. An eye whose grade and risk do not refer it is referred for oedema alone "
        "(`referral_reason: dme`).",
        "",
        f"Held out ({fit.get('source', 'n/a')}: every image of its patients and photo groups left out of training; "
        f"{fit.get('positives', 'n/a')} photos with DME, {fit.get('negatives', 'n/a')} without): AUC "
        f"{num(auc.get('value'))} (95% CI {num(auc.get('ci_low'))}-{num(auc.get('ci_high'))}, patient-grouped "
        f"bootstrap), sensitivity {num(fit.get('sensitivity'))}, specificity {num(fit.get('specificity'))} at "
        "the threshold.",
        "",
        "| held-out source | grade 0-1 eyes without a DME label flagged as DME |",
        "|---|---|",
    ]
    for source, rate in rule.get("flag_rate_grade_0_1", {}).items():
        lines.append(f"| {source} | {rate:.3f} |")
    lines += _oedema_referral_lines(rule.get("with_oedema_referrals") or {})
    lines += _against_risk_lines(rule.get("against_referable_risk") or {})
    lines += [
        "",
        "Only the Mexican photos carry DME labels, and they follow a collection batch: almost every photo of the "
        "first batch (patients 0001-1220) is DME, and darker. Training therefore also takes the grade-0 photos "
        "of the other sources as no-DME (oedema without retinopathy is rare), and the DME numbers above come from "
        "the one batch-homogeneous labelled set held out. The file names carry no institute, so no split by "
        "institute was possible.",
    ]
    return "\n".join(lines)


def _against_risk_lines(comparison: dict[str, Any]) -> list[str]:
    """The oedema head against the referable-DR risk as a DME score, on the labelled held-out photos."""
    if not comparison:
        return []

    def auc(cell: dict[str, Any]) -> str:
        value, low, high = cell.get("value"), cell.get("ci_low"), cell.get("ci_high")
        if not isinstance(value, int | float) or value != value:
            return "n/a"
        return f"{value:.3f} ({low:.3f}-{high:.3f})"

    lines = [
        "",
        f"Does the head see oedema, or the retinopathy that comes with it? DME AUC on {comparison['source']}'s "
        "held-out photos, of the head and of the referable-DR risk used as a DME score:",
        "",
        "| photos | n (DME) | oedema head | referable-DR risk |",
        "|---|---|---|---|",
    ]
    for name, label in (("all", "all labelled"), ("eyes_with_dr", "eyes with some DR")):
        row = comparison.get(name)
        if row:
            lines.append(
                f"| {label} | {row['n']} ({row['dme']}) | {auc(row['dme_head'])} | {auc(row['referable_risk'])} |"
            )
    return lines


def _oedema_referral_lines(table: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    """What oedema referrals add, per operating point and held-out source (referable DR as the truth)."""
    if not table:
        return []

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "",
        "Referable DR (grade 2 or worse) as the truth, every eye referred as the product refers it (grade, risk "
        "**or** oedema), held out:",
        "",
        "| operating point | held-out source | sensitivity | specificity | specificity without oedema referrals |",
        "|---|---|---|---|---|",
    ]
    for point, sources in table.items():
        for source, row in sources.items():
            lines.append(
                f"| {point} | {source} | {num(row.get('sensitivity'))} | {num(row.get('specificity'))} | "
                f"{num(row.get('specificity_dr_only'))} |"
            )
    return lines


def fellow_eye_section(rule: dict[str, Any]) -> str:
    """The card's fellow-eye section, from the rule ``retinagrade train`` chose on held-out predictions."""
    lines = [
        "## Fellow eye (batch endpoint and `grade --pair-eyes`)",
        f"An eye whose patient's other eye is graded in the same request also gets a paired answer: {rule['rule']}, "
        f"weight **{rule['weight']:.1f}**, referable when the fused P(grade >= 2) >= "
        f"**{rule['referable_threshold']:.4f}**; chosen on {rule['chosen_on']}. The single-image answer never "
        "changes; the patient's referral is made from the single-image answers.",
        "",
        "| held-out source | weight (chosen on the other sources) | image AUC own | image AUC fused | gain (95% CI) "
        "| patient AUC own | patient AUC fused |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) else "n/a"

    for source, row in rule.get("measured", {}).items():
        gain = row["image_auc_gain"]
        lines.append(
            f"| {source} | {row['weight']:.1f} | {num(row['image_auc_own'])} | {num(row['image_auc_fused'])} | "
            f"{gain['value']:+.3f} ({gain['ci_low']:+.3f} to {gain['ci_high']:+.3f}) | "
            f"{num(row.get('patient_auc_own'))} | {num(row.get('patient_auc_fused'))} |"
        )
    lines += [
        "",
        "Gain interval: patient-grouped bootstrap of the paired AUC difference. Mexico's labels are per patient, so "
        "its fellow-eye gain overstates what fusion does for eyes graded one by one.",
    ]
    return "\n".join(lines)


def gate_section(gate: dict[str, Any]) -> str:
    """The card's gate section, from the measurements ``retinagrade fit-gate`` records in the spec's ``gate_meta``."""
    lines = [
        "## Quality gate",
        "Before grading, a gate decides whether the image is a colour fundus photograph and whether a grader could "
        "read it. Not a fundus photograph (`not_fundus`, with a reason): cheap rules plus a learned detector "
        f"({gate.get('detector', 'none')}), in its own ONNX file checksummed in the spec. It is meant to refuse "
        "retinal OCT, fluorescein angiograms, external-eye photos, dermoscopy, endoscopy, microscopy, astronomy "
        "and faces. "
        "Ungradable (`ungradable`, with reasons): a grader could not assess DR because the photo is too dark, "
        "overexposed, too blurred to see vessels, or its field of view is largely cut off; the score is a logistic "
        "model on relative image features, corrected for input resolution so that small but readable photos pass.",
        "",
        f"- Fitted on {gate.get('fitted_on')}; split {gate.get('split')}.",
        f"- EyeQ ungradable-vs-gradable AUC on unseen patients {gate.get('eyeq_oof_auc')} "
        f"(95% CI {gate.get('eyeq_oof_auc_ci95')}).",
    ]
    if "loko_graded" in gate:
        share = gate.get("loko_not_fundus_share")
        lines.append(
            f"- Each negative kind left out of training in turn: {gate['loko_graded']} held-out negative(s) graded, "
            f"{share:.1%} called `not_fundus`; each negative source left out: {gate.get('loso_graded')} graded."
            if isinstance(share, float)
            else f"- Each negative kind left out of training in turn: {gate['loko_graded']} held-out negative(s) "
            "graded."
        )
    if isinstance(gate.get("lofso_max_not_fundus_share"), float):
        lines.append(
            "- A fundus source never seen in training: at most "
            f"{gate['lofso_max_not_fundus_share']:.1%} of its photos called `not_fundus`."
        )
    lines += [
        "- Ultra-widefield (Optos) images were not available to test; they are expected to be refused as "
        "`not_fundus` (their field and colours differ from every fundus source the detector saw).",
        "",
        "Per kind, per source and coverage tables: `docs/gate-report.md`.",
    ]
    return "\n".join(lines)


def write_card(spec_path: Path, out: Path, extra: list[Path] | None = None, lead: list[Path] | None = None) -> Path:
    """Render the card of ``spec_path`` into ``out``; ``extra`` files go at the end, ``lead`` files first."""
    spec = json.loads(spec_path.read_text())
    sections = [p.read_text() for p in extra or []]
    out.write_text(render_card(spec, sections, [p.read_text() for p in lead or []]))
    return out
