"""Validate the fitted gate the way it will fail, and write ``docs/gate-report.md``.

Every decision below is :func:`retinagrade.preprocessing.quality.decide` on the serving-path features, with
the detector's score taken from a head that never saw the image's group:

* leave-one-negative-kind-out: a kind never seen in training (OCT, dermoscopy, portraits...) must be refused;
* leave-one-negative-source-out: the same by source (images of one source look alike);
* leave-one-fundus-source-out: a fundus source never seen (APTOS, EyePACS, Mexico) must still pass.

Coverage (graded / all) per fundus folder uses the final gate, beside the out-of-fold EyeQ Reject AUC. Where the
grading model has read the photos the gradability score refuses (``FittedGate.p_referable``), every verdict
applies the referable override as serving does, and refusals are tabled per true grade with and without it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.preprocessing.quality import GateParams, QualityAssessment, decide, outrank_with_referable
from retinagrade.preprocessing.quality_features import FEATURE_NAMES
from retinagrade.training.gate.fit import (
    DETECTOR_C,
    KEEP_GRADABLE,
    MAX_FUNDUS_REFUSED,
    MAX_FUNDUS_REFUSED_ALL,
    N_FOLDS,
    FittedGate,
    LinearHead,
    held_out_logits,
)
from retinagrade.training.gate.measure import CAMERA_SET, EYEQ_SET, NEGATIVE_AUG_VIEWS, MeasuredSet

N_BOOT = 1000
#: Folders whose photos keep the camera's colours (not contrast-equalised derivatives), pooled in the report as
#: the closest thing here to the camera sets the maintainers measure refusals on.
CAMERA_COLOUR_FOLDERS: tuple[str, ...] = ("eyepacs-768", "raw-fundus-samples", "mexico-512")


def _status(v: QualityAssessment) -> str:
    return "not_fundus" if not v.is_fundus else ("graded" if v.gradable else "ungradable")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))))


def _decisions(
    fitted: FittedGate, views: np.ndarray, logits: np.ndarray, override: bool = True
) -> list[QualityAssessment]:
    """The gate's decision for the images of ``views`` (indices of images-as-sent) with held-out scores.

    With ``override`` (and the model's P(referable) measured), a score refusal the model outranks is graded, as
    in serving; without it, the gate's verdict before the model reads the photo.
    """
    out = []
    for v, logit in zip(views, logits, strict=True):
        dataset, i = fitted.detector.rows[int(fitted.detector.image[v])]
        features = dict(zip(FEATURE_NAMES, fitted.sets[dataset].quality[i], strict=True))
        verdict = decide(features, fitted.params, float(_sigmoid(np.asarray(logit))))
        p_referable = fitted.p_referable.get((dataset, i))
        if override and p_referable is not None:
            verdict = outrank_with_referable(verdict, p_referable, fitted.params)
        out.append(verdict)
    return out


def read_grades(data_root: Path, sets: Mapping[str, MeasuredSet]) -> dict[str, list[int | None]]:
    """Each folder's true DR grade per record, from the ``grade`` column of its labels (None where empty)."""
    out: dict[str, list[int | None]] = {}
    for name, measured in sets.items():
        with (data_root / name / "labels.csv").open(newline="", encoding="utf-8") as fh:
            by_image = {row["image"]: (row.get("grade") or "").strip() for row in csv.DictReader(fh)}
        out[name] = [int(float(g)) if (g := by_image.get(r.image, "")) else None for r in measured.records]
    return out


def refusals_by_grade(
    folders: Mapping[str, list[tuple[int, QualityAssessment, QualityAssessment]]],
    grades: Mapping[str, list[int | None]],
) -> list[dict[str, Any]]:
    """Refusals per folder and true grade, before and after the referable override.

    Args:
        folders: per folder, (record index, the gate's verdict alone, the verdict as served) of each image.
        grades: per folder, the true grade of each record (:func:`read_grades`); None where it has none.

    Returns:
        One row per folder and grade (grade None: no ICDR grade, e.g. a negative or Mexico's NPDR): photos,
        refused by the gate alone, refused as served, and graded with a quality warning.
    """
    rows = []
    for name, verdicts in folders.items():
        folder_grades = grades.get(name, [])
        by_grade: dict[int | None, list[tuple[QualityAssessment, QualityAssessment]]] = {}
        for i, alone, served in verdicts:
            by_grade.setdefault(folder_grades[i] if i < len(folder_grades) else None, []).append((alone, served))
        for grade in sorted(by_grade, key=lambda g: -1 if g is None else g):
            members = by_grade[grade]
            rows.append(
                {
                    "folder": name,
                    "grade": grade,
                    "n": len(members),
                    "refused_gate": sum(not (alone.is_fundus and alone.gradable) for alone, _ in members),
                    "refused": sum(not (served.is_fundus and served.gradable) for _, served in members),
                    "warned": sum(served.warning for _, served in members),
                }
            )
    return rows


def _table(fitted: FittedGate, groups: dict[str, np.ndarray], logits: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    data = fitted.detector
    for name, mask in groups.items():
        sent = data.aug[mask] == 0
        views = np.flatnonzero(mask)[sent]
        verdicts = _decisions(fitted, views, logits[name][sent])
        statuses = [_status(v) for v in verdicts]
        scores = [v.fundus_score or 0.0 for v in verdicts]
        aug_logits = logits[name][~sent]
        rows.append(
            {
                "group": name,
                "n": len(views),
                "not_fundus": statuses.count("not_fundus"),
                "ungradable": statuses.count("ungradable"),
                "graded": statuses.count("graded"),
                "max_fundus_score": max(scores) if scores else math.nan,
                "detector_passed": int(sum(s >= fitted.params.detector.threshold for s in scores))
                if fitted.params.detector is not None
                else 0,
                "aug_n": int((~sent).sum()),
                "aug_detector_passed": int((_sigmoid(aug_logits) >= fitted.params.detector.threshold).sum())
                if fitted.params.detector is not None
                else 0,
                "graded_images": [
                    Path(fitted.detector.rows[int(data.image[v])][0]).name
                    + "/"
                    + Path(
                        fitted.sets[fitted.detector.rows[int(data.image[v])][0]]
                        .records[fitted.detector.rows[int(data.image[v])][1]]
                        .image
                    ).name
                    for v, s in zip(views, statuses, strict=True)
                    if s == "graded"
                ],
            }
        )
    return rows


def _final_logits(fitted: FittedGate) -> np.ndarray:
    det = fitted.params.detector
    assert det is not None
    head = LinearHead(np.asarray(det.mean), np.asarray(det.scale), np.asarray(det.coef), det.intercept)
    return head.logit(fitted.detector.x.astype(np.float64))


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


def evaluate(
    fitted: FittedGate,
    progress: Callable[[str], None] | None = None,
    grades: Mapping[str, list[int | None]] | None = None,
) -> dict[str, Any]:
    """Every number the report quotes; ``grades`` (:func:`read_grades`) adds the refusals by true grade."""
    from retinagrade.training.metrics import bootstrap_ci

    data = fitted.detector
    params = fitted.params
    neg = data.y == 0
    kind_groups = {k: neg & (data.kind == k) for k in sorted(np.unique(data.kind[neg]))}
    source_groups = {s: neg & (data.source == s) for s in sorted(np.unique(data.source[neg]))}
    kind_logits = held_out_logits(data, kind_groups, progress)
    source_logits = held_out_logits(data, source_groups, progress)
    from retinagrade.training.gate.fit import fundus_source_groups

    fundus_groups = fundus_source_groups(data)
    fundus_logits = {name: fitted.lofso_logits[mask] for name, mask in fundus_groups.items()}
    results: dict[str, Any] = {
        "loko": _table(fitted, kind_groups, kind_logits),
        "loso": _table(fitted, source_groups, source_logits),
        "lofso": _table(fitted, fundus_groups, fundus_logits),
    }

    # The final gate on every folder (what `retinagrade grade` does with the shipped files).
    final = _final_logits(fitted)
    sent = data.aug == 0
    per_folder = []
    folder_verdicts: dict[str, list[tuple[int, QualityAssessment]]] = {}
    both_verdicts: dict[str, list[tuple[int, QualityAssessment, QualityAssessment]]] = {}
    for name in fitted.sets:
        views = np.flatnonzero(sent & (data.dataset == name))
        verdicts = _decisions(fitted, views, final[views])
        idx = [data.rows[int(data.image[v])][1] for v in views]
        folder_verdicts[name] = list(zip(idx, verdicts, strict=True))
        alone = _decisions(fitted, views, final[views], override=False)
        both_verdicts[name] = list(zip(idx, alone, verdicts, strict=True))
        statuses = [_status(v) for v in verdicts]
        per_folder.append(
            {
                "folder": name,
                "n": len(statuses),
                "not_fundus": statuses.count("not_fundus"),
                "ungradable": statuses.count("ungradable"),
                "graded": statuses.count("graded"),
                "warned": sum(v.warning for v in verdicts),
            }
        )
    results["final"] = per_folder
    override = params.referable_override
    results["override"] = {
        "min_p_referable": None if override is None else override.min_p_referable,
        "measured": bool(fitted.p_referable),
        "photos_read": len(fitted.p_referable),
    }
    results["by_grade"] = refusals_by_grade(both_verdicts, grades) if grades is not None else []

    # Coverage by quality label and resolution.
    coverage = []
    camera = fitted.sets.get(CAMERA_SET)
    for name in (EYEQ_SET, CAMERA_SET):
        if name not in folder_verdicts:
            continue
        records = fitted.sets[name].records
        for label in ("Good", "Usable", "Reject"):
            members = [v for i, v in folder_verdicts[name] if records[i].quality == label]
            if members:
                graded = sum(_status(v) == "graded" for v in members)
                warned = sum(v.warning for v in members)
                coverage.append({"what": f"{name} {label}", "n": len(members), "graded": graded, "warned": warned})
    if camera is not None and len(camera.small_index):
        # The same camera photos as APTOS-like 224 px derivatives (the final detector is not applied: the
        # derivative's fundus score is not measured; the gradability part is what this row checks).
        for label in ("Good", "Usable", "Reject", "(none)"):
            rows = [
                k for k, i in enumerate(camera.small_index) if (camera.records[int(i)].quality or "(none)") == label
            ]
            if not rows:
                continue
            gradable = 0
            for k in rows:
                f = dict(zip(FEATURE_NAMES, camera.quality_224[k], strict=True))
                v = decide(f, params, 1.0)
                gradable += v.is_fundus and v.gradable
            coverage.append(
                {
                    "what": f"{CAMERA_SET} {label}, as 224 px derivatives (gradability only, no override)",
                    "n": len(rows),
                    "graded": gradable,
                    "warned": 0,
                }
            )
    results["coverage"] = coverage
    results["raw_samples"] = [
        {
            "image": Path(fitted.sets["raw-fundus-samples"].records[i].image).name,
            "status": _status(v) + (" (quality warning)" if v.warning else ""),
            "quality": round(v.score, 3),
            "fundus_score": round(v.fundus_score or 0.0, 3),
            "reasons": list(v.reasons),
        }
        for i, v in folder_verdicts.get("raw-fundus-samples", [])
    ]
    results["non_fundus_1"] = [
        {
            "image": Path(fitted.sets["non-fundus"].records[i].image).name,
            "kind": fitted.sets["non-fundus"].records[i].kind,
            "status": _status(v),
            "fundus_score": round(v.fundus_score or 0.0, 3),
            "reasons": list(v.reasons),
        }
        for i, v in folder_verdicts.get("non-fundus", [])
    ]

    # Gradability, out of fold by patient.
    grad = fitted.grad
    eyeq = grad.domain == "eyeq"
    auc, lo, hi = bootstrap_ci(
        _auc, grad.y[eyeq], fitted.grad_oof[eyeq], n_boot=N_BOOT, seed=0, groups=grad.group[eyeq]
    )
    refused = fitted.grad_rule_fired | (fitted.grad_oof >= params.threshold)
    domains = []
    for domain in dict.fromkeys(grad.domain.tolist()):
        m = grad.domain == domain
        if not m.any():
            continue
        y = grad.y[m]
        domains.append(
            {
                "domain": domain,
                "n": int(m.sum()),
                "n_reject": int(y.sum()),
                "auc": _auc(y, fitted.grad_oof[m]) if (y == 1).any() else math.nan,
                "sensitivity": float(refused[m][y == 1].mean()) if (y == 1).any() else math.nan,
                "kept": float((~refused[m][y == 0]).mean()) if (y == 0).any() else math.nan,
            }
        )
    results["gradability"] = {"eyeq_auc": auc, "eyeq_auc_ci": [lo, hi], "domains": domains}

    negatives_all = [r for r in results["loko"]]
    n_neg = sum(r["n"] for r in negatives_all)
    results["summary"] = {
        "eyeq_oof_auc": round(auc, 4),
        "eyeq_oof_auc_ci95": [round(lo, 4), round(hi, 4)],
        "loko_graded": int(sum(r["graded"] for r in results["loko"])),
        "loso_graded": int(sum(r["graded"] for r in results["loso"])),
        "loko_not_fundus_share": round(sum(r["not_fundus"] for r in negatives_all) / max(n_neg, 1), 4),
        "lofso_max_not_fundus_share": round(max(r["not_fundus"] / max(r["n"], 1) for r in results["lofso"]), 4),
    }
    return results


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------


def _num(value: float, fmt: str) -> str:
    return "-" if not math.isfinite(value) else fmt.format(value)


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f} %" if b else "-"


def _decision_table(rows: Sequence[dict[str, Any]], title: str, with_aug: bool) -> list[str]:
    head = f"| {title} | images | not_fundus | ungradable | graded | detector passed | max P(fundus) |"
    sep = "|---|---|---|---|---|---|---|"
    if with_aug:
        head += " augmented views passing detector |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['group']} | {r['n']} | {r['not_fundus']} ({_pct(r['not_fundus'], r['n'])}) | {r['ungradable']} | "
            f"**{r['graded']}** | {r['detector_passed']} | {r['max_fundus_score']:.3f} |"
        )
        if with_aug:
            line += f" {r['aug_detector_passed']} of {r['aug_n']} |"
        lines.append(line)
    total = {k: sum(r[k] for r in rows) for k in ("n", "not_fundus", "ungradable", "graded", "detector_passed")}
    lines.append(
        f"| **all** | {total['n']} | {total['not_fundus']} ({_pct(total['not_fundus'], total['n'])}) | "
        f"{total['ungradable']} | **{total['graded']}** | {total['detector_passed']} | |" + (" |" if with_aug else "")
    )
    graded = [g for r in rows for g in r["graded_images"]]
    if graded:
        lines += ["", "Graded although not a fundus photo: " + ", ".join(f"`{g}`" for g in graded) + "."]
    return lines


def _override_text(params: GateParams) -> list[str]:
    override = params.referable_override
    if override is None:
        return []
    return [
        "4. **graded, with a quality warning**: a photo refused by the gradability score alone (no hard rule,",
        "   never `not_fundus`) is still read by the grading model, and graded when its calibrated",
        f"   P(referable) is at least {override.min_p_referable:.2f}: the haze, haemorrhages and new vessels of",
        "   advanced disease lower contrast and sharpness, so the score alone refuses the sickest eyes most",
        "   often. The answer keeps the quality reasons and sets `quality.warning` (CSV `quality_warning`).",
    ]


def _by_grade_section(results: dict[str, Any]) -> list[str]:
    override = results.get("override", {})
    rows = results.get("by_grade", [])
    if not rows:
        return []
    lines = [
        "",
        "## Refusals by true grade",
        "",
        "Refused = `not_fundus` or `ungradable`, final gate, every photo of each folder. *Gate alone*: the",
        "verdict before the grading model reads the photo; *as served*: after a confident referable answer",
        f"(P(referable) >= {override.get('min_p_referable')}) outranked a refusal by the gradability score, as",
        "`retinagrade grade`, `validate` and the service do (the photo is then graded with a quality warning).",
        "True grade `-`: none given (the negatives; Mexico's NPDR photos, grade 1-3 unknown).",
    ]
    if not override.get("measured"):
        lines += ["", "The grading model was not run (no model spec): *as served* equals *gate alone* here."]
    else:
        lines += [
            f"The grading model read the {override.get('photos_read')} photos (of every folder, negatives",
            "included) that the gradability score refuses.",
        ]
    lines += [
        "",
        "| folder | true grade | photos | refused, gate alone | refused, as served | graded with a quality warning |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        grade = "-" if r["grade"] is None else str(r["grade"])
        lines.append(
            f"| {r['folder']} | {grade} | {r['n']} | {r['refused_gate']} ({_pct(r['refused_gate'], r['n'])}) | "
            f"{r['refused']} ({_pct(r['refused'], r['n'])}) | {r['warned']} |"
        )
    lines += [
        "",
        "Pooled (the issue's measure: proliferative photos refused against healthy ones):",
        "",
        "| folders | true grade | photos | refused, gate alone | refused, as served |",
        "|---|---|---|---|---|",
    ]
    graded_folders = sorted({r["folder"] for r in rows if r["grade"] is not None})
    for label, folders in (
        (
            "camera colours: " + ", ".join(f for f in CAMERA_COLOUR_FOLDERS if f in graded_folders),
            CAMERA_COLOUR_FOLDERS,
        ),
        ("every graded folder", tuple(graded_folders)),
    ):
        for pooled_grade in (0, 4):
            members = [r for r in rows if r["folder"] in folders and r["grade"] == pooled_grade]
            n, before, after = (sum(r[k] for r in members) for k in ("n", "refused_gate", "refused"))
            if n:
                lines.append(
                    f"| {label} | {pooled_grade} | {n} | {before} ({_pct(before, n)}) | {after} ({_pct(after, n)}) |"
                )
    return lines


def render_report(params: GateParams, results: dict[str, Any], command: str, seconds: float) -> str:
    """docs/gate-report.md: every number comes from ``results`` of one run of ``command``."""
    det = params.detector
    assert det is not None
    g = results["gradability"]
    lines = [
        "# The gate: is it a colour fundus photograph, and can a grader read it? Measured results",
        "",
        "Produced by (repository root, data in `../shared/data`, features cached under `runs/gate-cache/`):",
        "",
        f"    {command}",
        "",
        f"Fit and validation took {seconds:.0f} s on a shared 2-core machine. Parameters: `models/gate.json`;",
        f"detector backbone: `models/{det.file}` (sha256 `{det.sha256[:16]}...`, also listed in the model spec's",
        "`gate_files`, checked at load like the model). Every image goes through the serving path",
        "(`decode_image` -> `prepare_fundus` with the shipped model's preprocessing -> `compute_quality_features`;",
        f"the detector sees a {det.input_side} px letterboxed thumbnail of the whole decoded image).",
        "",
        "## What the gate decides",
        "",
        "1. **not_fundus**: the learned detector's P(colour fundus photograph) is below "
        f"{det.threshold:.4g} (reason `unlike_fundus_photos`), or a cheap rule fires (grayscale, no field of",
        "   view, tiny image, no dark surround, green colours). Near misses - retinal OCT, fluorescein angiograms,",
        "   dermoscopy, petri dishes, microscopy with a round field stop, the sun or moon, portraits - are",
        "   `not_fundus`, never `ungradable`.",
        "2. **ungradable** (a fundus photo a grader could not assess for DR): too dark, overexposed, too blurred",
        "   to see vessels, field of view largely cut off, or low overall quality by the EyeQ-fitted score. The",
        "   score is calibrated per input resolution (below), so a small or slightly soft photo that a grader",
        "   reads (224 px APTOS) is not refused for being small.",
        "3. Otherwise **graded**.",
        *_override_text(params),
        "",
        "Detector: frozen ImageNet EfficientNet-Lite0 (its own ONNX file, independent of the grading model,",
        "so retraining the grader does not move the gate), globally pooled features of stages 4-7 and the",
        f"1x1 head ({len(det.coef)} numbers), logistic regression (C={DETECTOR_C}) weighted so every negative",
        "*kind* weighs the same (the 132 angiograms are one kind) and every fundus folder weighs the same.",
        "Training views: every image as sent, plus 1 augmented view per fundus photo (rescales, JPEG",
        "re-compression, crops that keep the disc, exposure, flips) and "
        f"{NEGATIVE_AUG_VIEWS} per negative (crops, rescales,",
        "colour casts towards retinal orange, a round black field stop, flips). No fundus photo is ever a",
        "negative. Threshold: the highest at which, out of fold (5 folds by patient: a photo is scored by a",
        f"head that never saw its patient), no fundus folder loses more than {100 * MAX_FUNDUS_REFUSED:.1f} % of "
        "the photos the rest of",
        f"the gate would grade, nor more than {100 * MAX_FUNDUS_REFUSED_ALL:.1f} % of all its photos "
        "(an unreadable frame called",
        "not_fundus instead of ungradable recalls no extra patient).",
        "",
        "## Leave-one-negative-kind-out",
        "",
        "Each row: the detector head refitted without any image (or augmented view) of that kind; its images",
        "as sent then go through the whole gate. Target: 0 graded, >= 98 % not_fundus.",
        "",
        *_decision_table(results["loko"], "held-out kind", True),
        "",
        "## Leave-one-negative-source-out",
        "",
        *_decision_table(results["loso"], "held-out source", True),
        "",
        "## Leave-one-fundus-source-out",
        "",
        "Each row: the detector head refitted without that fundus source (EyePACS folders that share",
        "patients and processing are held out together). The not-a-fundus rules and the gradability model",
        "are the final ones (the rules use no negative; out-of-fold gradability coverage is in the Gradability",
        "table). Target: <= 0.5 % not_fundus on every source.",
        "",
        "| held-out fundus source | images | not_fundus | ungradable | graded (coverage) |",
        "|---|---|---|---|---|",
    ]
    for r in results["lofso"]:
        lines.append(
            f"| {r['group']} | {r['n']} | {r['not_fundus']} ({_pct(r['not_fundus'], r['n'])}) | {r['ungradable']} | "
            f"{r['graded']} ({_pct(r['graded'], r['n'])}) |"
        )
    lines += [
        "",
        "## The shipped gate on every folder",
        "",
        "Final detector head and gradability model (in sample for the detector; the tables above are the",
        "out-of-sample evidence).",
        "",
        "| folder | images | not_fundus | ungradable | graded (coverage) | of them with a quality warning |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["final"]:
        lines.append(
            f"| {r['folder']} | {r['n']} | {r['not_fundus']} ({_pct(r['not_fundus'], r['n'])}) | "
            f"{r['ungradable']} ({_pct(r['ungradable'], r['n'])}) | {r['graded']} ({_pct(r['graded'], r['n'])}) | "
            f"{r['warned']} |"
        )
    lines += [
        "",
        "Coverage by EyeQ quality label:",
        "",
        "| photos | n | graded (coverage) | of them with a quality warning |",
        "|---|---|---|---|",
    ]
    for r in results["coverage"]:
        lines.append(f"| {r['what']} | {r['n']} | {r['graded']} ({_pct(r['graded'], r['n'])}) | {r['warned']} |")
    lines += _by_grade_section(results)
    lo, hi = g["eyeq_auc_ci"]
    lines += [
        "",
        "## Gradability",
        "",
        f"Logistic regression for P(ungradable) on {len(params.features)} relative features "
        f"({', '.join(params.features)}),",
        "fitted on EyeQ labels (Reject vs Good + Usable) and the EyePACS-768 camera photos that carry EyeQ labels,",
        "at camera resolution and as APTOS-like 224 px derivatives (whole frame squashed to 224 x 224, JPEG q95),",
        "plus every photo of the DR-graded folders (APTOS, Mexico, EyePACS-256) as a gradable example: graders",
        "graded them, and they show what EyeQ lacks (camera colours, laser scars and haemorrhages whose contrast is",
        "disease, not poor quality). Threshold chosen on the EyeQ-labelled photos only.",
        f"{N_FOLDS}-fold GroupKFold by EyePACS patient across folders. Threshold: keep "
        f"{100 * KEEP_GRADABLE:.0f} % of Good/Usable out of fold.",
        "",
        f"**EyeQ Reject ROC AUC, out of fold (unseen patients): {g['eyeq_auc']:.3f}** (95 % CI {lo:.3f}-{hi:.3f},",
        f"patient bootstrap, {N_BOOT} resamples). Threshold on P(ungradable): {params.threshold:.4g}.",
        "",
        "| photos (out of fold) | n (Reject) | ROC AUC | Reject refused | Good/Usable (or graded) kept |",
        "|---|---|---|---|---|",
    ]
    for r in g["domains"]:
        lines.append(
            f"| {r['domain']} | {r['n']} ({r['n_reject']}) | {_num(r['auc'], '{:.3f}')} | "
            f"{_num(100 * r['sensitivity'], '{:.1f} %')} | "
            f"{100 * r['kept']:.1f} % |"
        )
    cal = params.calibration
    lines += [
        "",
        "**Resolution calibration.** The same photos at camera resolution and as 224 px derivatives: each",
        "feature's median paired drift, subtracted before the model, interpolated in log field-of-view diameter",
        "(held constant outside the knots):",
        "",
        "| feature | " + " | ".join(f"offset at {d:.0f} px" for d in (cal.diameters if cal else ())) + " |",
        "|---|" + "---|" * (len(cal.diameters) if cal else 0),
    ]
    if cal is not None:
        for name, offsets in cal.offsets.items():
            lines.append(f"| `{name}` | " + " | ".join(f"{o:+.4g}" for o in offsets) + " |")
    lines += [
        "",
        "## Rules",
        "",
        "| kind | feature | fires when | reason code |",
        "|---|---|---|---|",
    ]
    for kind, rules in (("not a fundus", params.not_fundus_rules), ("ungradable", params.ungradable_rules)):
        for rule in rules:
            cond = f"< {rule.min:.4g}" if rule.min is not None else f"> {rule.max:.4g}"
            lines.append(f"| {kind} | `{rule.feature}` | {cond} | `{rule.reason}` |")
    lines += [
        "",
        "Not-a-fundus thresholds: the minimum (maximum) of the feature over every fundus photo here, halved",
        "(doubled; x1.5 for `green_fraction`); negatives never set a threshold. Ungradable thresholds: the",
        "0.1 / 99.9 percentiles over photos graders graded (every DR-graded folder; EyePACS Good/Usable).",
        "",
        "## Raw camera JPEGs",
        "",
        "| image | status | quality | P(fundus) | reasons |",
        "|---|---|---|---|---|",
    ]
    for r in results["raw_samples"]:
        lines.append(
            f"| {r['image']} | {r['status']} | {r['quality']:.3f} | {r['fundus_score']:.3f} | "
            f"{', '.join(r['reasons'])} |"
        )
    lines += [
        "",
        "## scikit-image samples (`non-fundus`)",
        "",
        "| image | kind | status | P(fundus) | reasons |",
        "|---|---|---|---|---|",
    ]
    for r in results["non_fundus_1"]:
        lines.append(
            f"| {r['image']} | {r['kind']} | {r['status']} | {r['fundus_score']:.3f} | {', '.join(r['reasons'])} |"
        )
    lines += [
        "",
        "`microaneurysms.png` (a tiny grayscale crop of a fundus) is neither a positive nor a negative in",
        "training; `retina.jpg` is a real colour fundus photo and a positive.",
        "",
        "## Ultra-widefield and other images this data cannot show",
        "",
        "No ultra-widefield (Optos) image is in the data. They are pseudo-colour (red/green laser, no blue),",
        "show eyelids and lashes and fill the frame without a round field stop. Expect them to be refused as",
        "`not_fundus` (the detector has seen no such image; `no_dark_surround` or `not_fundus_colour` may fire).",
        "The grading model is not trained on them either, so refusal is the intended outcome: grade them",
        "elsewhere. Smartphone/handheld fundus photos are likewise unmeasured.",
        "",
        "## Limits",
        "",
        "- Negatives: 409 real images from 19 sources here; a private test set from other sources exists. A",
        "  held-out kind that resembles a fundus photo more than anything seen (dermoscopy: a round lesion",
        "  field) is the weak point; see its row above.",
        "- APTOS and Mexico carry no quality label: their `ungradable` share is a cost (graders graded them),",
        "  not an error rate.",
        "- Six raw camera JPEGs cannot measure accuracy at full resolution.",
        "",
        "Summary (also in `gate.json` meta): " + json.dumps(results["summary"]),
        "",
    ]
    return "\n".join(lines)
