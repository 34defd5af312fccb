"""Ensembles of tails on one frozen stem: scored on held-out logits, exported as one ONNX graph.

Runs of the same stem (same backbone, frozen stages and input size, frozen ImageNet stem) differ only in their
tails (the trained stages and heads). :func:`average_held_out` averages the held-out logits of several runs
(each row over the runs that held it out), which is exactly what the exported ensemble computes, so a LOSO
comparison of an ensemble costs no new fit. :func:`load_ensemble` joins the runs' tails on the shared stem;
``retinagrade export RUN --with-run RUN2 ...`` exports it as one graph whose outputs are the tails' means.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinagrade.constants import REFERABLE_MIN_GRADE
from retinagrade.training import metrics as M

if TYPE_CHECKING:
    from retinagrade.training.model import TailEnsemble

log = logging.getLogger(__name__)

#: Per-row arrays averaged over the runs that held the row out.
_AVERAGED = ("logits", "regression", "logit_dme")
#: Per-row arrays that must be the same in every run (which image a row is).
_IDENTITY = ("image", "source", "group", "grade_low", "grade_high")


def _logits_file(path: Path) -> Path:
    return path / "loso_logits.npz" if path.is_dir() else path


def average_held_out(paths: list[Path]) -> dict[str, np.ndarray]:
    """Mean held-out outputs of several runs' ``loso_logits.npz`` (run folders or files), row by row over the
    runs that held the row out; ``n_models`` says how many. Rows must be the same images in every file."""
    if not paths:
        raise ValueError("no held-out logits to average")
    parts = [dict(np.load(_logits_file(p))) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if part["logits"].shape != first["logits"].shape:
            raise ValueError(f"{path}: {len(part['logits'])} rows, {paths[0]} has {len(first['logits'])}")
        for name in _IDENTITY:
            if name in first and name in part and not np.array_equal(part[name], first[name]):
                raise ValueError(f"{path}: its rows are other images than {paths[0]}'s (column {name})")
    held = np.stack([p["held"].astype(bool) for p in parts])
    count = held.sum(axis=0)
    out: dict[str, np.ndarray] = {name: first[name] for name in _IDENTITY if name in first}
    for name in _AVERAGED:
        if not all(name in p for p in parts):
            continue
        stacked = np.stack([p[name] for p in parts]).astype(np.float64)
        mask = held.reshape(held.shape + (1,) * (stacked.ndim - 2))
        total = (stacked * mask).sum(axis=0)
        divisor = np.maximum(count, 1).reshape((-1,) + (1,) * (stacked.ndim - 2))
        out[name] = (total / divisor).astype(np.float32)
    out["held"] = count > 0
    out["n_models"] = count
    return out


def referable_auc_by_source(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Threshold-free referable AUC (softmax P(grade >= 2)) per held-out source, on rows whose referable truth
    is known (a grade range straddling grade 2 is left out)."""
    if "source" not in arrays:
        raise ValueError("the logits file names no sources (written before v3): re-run its LOSO")
    held = arrays["held"].astype(bool)
    low, high = arrays["grade_low"], arrays["grade_high"]
    truth = np.where(low >= REFERABLE_MIN_GRADE, 1, np.where(high < REFERABLE_MIN_GRADE, 0, -1))
    p_ref = M.softmax(arrays["logits"])[:, REFERABLE_MIN_GRADE:].sum(axis=1)
    result: dict[str, dict[str, Any]] = {}
    for source in sorted(set(arrays["source"][held].tolist())):
        rows = held & (arrays["source"] == source) & (truth >= 0)
        auc = M._auc_or_nan(truth[rows] == 1, p_ref[rows])
        result[source] = {"n": int(rows.sum()), "referable_auc": None if np.isnan(auc) else round(float(auc), 4)}
    return result


def score_runs(runs: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The runs' averaged held-out outputs (:func:`average_held_out`) and the referable AUC per held-out source
    of the ensemble and of each run alone (``retinagrade ensemble-loso``)."""
    members = {str(r): referable_auc_by_source(average_held_out([r])) for r in runs}
    arrays = average_held_out(list(runs))
    combined = referable_auc_by_source(arrays)
    return arrays, {"runs": [str(r) for r in runs], "ensemble": combined, "members": members}


def write_scores(out: Path, arrays: dict[str, np.ndarray], report: dict[str, Any]) -> None:
    """``loso_logits.npz`` (the averaged outputs, as a run's own) and ``ensemble.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = dict(arrays)
    np.savez(out / "loso_logits.npz", **saved)
    (out / "ensemble.json").write_text(json.dumps(report, indent=2))


def load_ensemble(run_dirs: list[Path]) -> tuple[TailEnsemble, dict[str, Any]]:
    """The tails of several runs on their shared stem (checked identical) and the first run's config."""
    import torch

    from retinagrade.training.model import TailEnsemble, load_run_model

    loaded = [load_run_model(d) for d in run_dirs]
    net, cfg = loaded[0]
    for run_dir, (other, other_cfg) in zip(run_dirs[1:], loaded[1:], strict=True):
        for key in ("arch", "frozen_stages", "input_size"):
            if other_cfg[key] != cfg[key]:
                raise ValueError(f"{run_dir}: {key} {other_cfg[key]!r}, {run_dirs[0]} has {cfg[key]!r}")
        ours, theirs = net.stem.state_dict(), other.stem.state_dict()
        if any(not torch.equal(ours[k], theirs[k]) for k in ours):
            raise ValueError(f"{run_dir}: its frozen stem differs from {run_dirs[0]}'s: not one shared stem")
        if other.tail.output_names != net.tail.output_names:
            raise ValueError(f"{run_dir}: outputs {other.tail.output_names}, {run_dirs[0]} has {net.tail.output_names}")
    return TailEnsemble(net.stem, [n.tail for n, _ in loaded]).eval(), cfg


def _held_rows(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Held-out rows of one recipe's LOSO runs (one run per held-out source), keyed by image path."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        arrays = dict(np.load(_logits_file(path)))
        if "source" not in arrays:
            raise ValueError(f"{path}: the logits file names no sources (written before v3): re-run its LOSO")
        p_ref = M.softmax(arrays["logits"])[:, REFERABLE_MIN_GRADE:].sum(axis=1)
        for i in np.flatnonzero(arrays["held"].astype(bool)):
            image = str(arrays["image"][i])
            if image in rows:
                raise ValueError(f"{path}: {image} is held out by two runs of one side: compare recipes, not seeds")
            rows[image] = {
                "source": str(arrays["source"][i]),
                "group": str(arrays["group"][i]),
                "low": int(arrays["grade_low"][i]),
                "high": int(arrays["grade_high"][i]),
                "p": float(p_ref[i]),
            }
    return rows


def compare_recipes(a: list[Path], b: list[Path], n_boot: int = 2000) -> dict[str, Any]:
    """Paired referable-AUC difference (A minus B) per held-out source, on the images both recipes held out.

    Each side is a recipe's LOSO runs (one folder or logits file per held-out source); rows are matched by
    image path, so the two recipes may have trained on different source lists. The interval resamples
    patients (split groups) with replacement, both recipes' scores of an image together.
    """

    from retinagrade.training.decisions import referable_truth

    def difference(y: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> float:
        return float(M._auc_or_nan(y, sa) - M._auc_or_nan(y, sb))

    rows_a, rows_b = _held_rows(a), _held_rows(b)
    common = sorted(set(rows_a) & set(rows_b))
    result: dict[str, Any] = {"a": [str(p) for p in a], "b": [str(p) for p in b], "sources": {}}
    for source in sorted({rows_a[i]["source"] for i in common}):
        images = [i for i in common if rows_a[i]["source"] == source]
        truth = referable_truth(
            np.array([rows_a[i]["low"] for i in images]), np.array([rows_a[i]["high"] for i in images])
        )
        known = truth >= 0
        y = truth[known] == 1
        sa = np.array([rows_a[i]["p"] for i in images])[known]
        sb = np.array([rows_b[i]["p"] for i in images])[known]
        groups = np.array([rows_a[i]["group"] for i in images])[known]
        if not 0 < y.sum() < len(y):
            continue
        value, low_ci, high_ci = M.bootstrap_ci(difference, y, sa, sb, n_boot=n_boot, groups=groups)
        result["sources"][source] = {
            "n": len(y),
            "auc_a": round(float(M._auc_or_nan(y, sa)), 4),
            "auc_b": round(float(M._auc_or_nan(y, sb)), 4),
            "difference": {"value": round(value, 4), "ci_low": round(low_ci, 4), "ci_high": round(high_ci, 4)},
        }
    return result
