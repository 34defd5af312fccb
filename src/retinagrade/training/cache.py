"""Caches that make CPU training feasible: prepared images, and frozen-stem features of augmented views.

Prepared images go through exactly the serving code (``decode_image`` + ``prepare_fundus``). Stem features are
computed with ONNX Runtime (several times faster than eager PyTorch on CPU) from the exported frozen stem.
Cache files are keyed by a hash of everything that determines their content.

The feature cache holds, per image, view 0 (the unaugmented image), then ``views`` views augmented on the
prepared image (:func:`~retinagrade.training.augment.augment`), then ``artefact_views`` views whose raw photo was
first degraded by :func:`~retinagrade.training.augment.fundus_artefacts` and then prepared and augmented, and
(``flipped``, for horizontal-flip test-time augmentation) the clean image mirrored left to right, never drawn in
training. Training recipes that differ only in which views they sample share one cache (:func:`view_indices`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from retinagrade.preprocessing.decode import load_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, batch_tensor, prepare_fundus
from retinagrade.training.augment import ARTEFACTS_VERSION, augment, fundus_artefacts
from retinagrade.training.data import Sample

log = logging.getLogger(__name__)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_one(args: tuple[str, dict[str, Any]]) -> np.ndarray:
    path, cfg = args
    config = PreprocessConfig.from_dict(cfg)
    decoded = load_image(path, min_side=config.decode_min_side)
    image: np.ndarray = prepare_fundus(decoded, config).model_image
    return image


def source_runs(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive samples from one source (label files are read whole, in order)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or samples[i].source != samples[start].source:
            runs.append((start, i))
            start = i
    return runs


def _concatenate(parts: Sequence[np.ndarray], target: Path) -> np.ndarray:
    """Write ``parts`` one after another into the ``.npy`` file ``target`` (atomically) and memory-map it."""
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    out = np.lib.format.open_memmap(target.with_suffix(".tmp.npy"), mode="w+", dtype=parts[0].dtype, shape=shape)
    row = 0
    for part in parts:
        for start in range(0, len(part), 512):
            block = np.asarray(part[start : start + 512])
            out[row : row + len(block)] = block
            row += len(block)
    out.flush()
    del out
    target.with_suffix(".tmp.npy").rename(target)
    return np.load(target, mmap_mode="r")


def prepared_images(
    samples: Sequence[Sample], config: PreprocessConfig, cache_dir: Path, workers: int = 2
) -> np.ndarray:
    """N x S x S x 3 uint8 prepared model images, computed once and memory-mapped afterwards.

    Each source is cached on its own and the sources are joined, so a recipe that adds or drops a source
    recomputes nothing for the others.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(s.path) for s in samples]
    target = cache_dir / f"prepared-{_key(paths, config.to_dict())}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    runs = source_runs(samples)
    if len(runs) > 1:
        parts = [prepared_images(samples[a:b], config, cache_dir, workers) for a, b in runs]
        return _concatenate(parts, target)
    size = config.input_size
    out = np.lib.format.open_memmap(
        target.with_suffix(".tmp.npy"), mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )
    jobs = [(p, config.to_dict()) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(_prepare_one, jobs, chunksize=16)):
            out[i] = image
            if i % 500 == 0:
                log.info("prepared %d/%d images", i, len(paths))
    out.flush()
    del out
    target.with_suffix(".tmp.npy").rename(target)
    return np.load(target, mmap_mode="r")


def view_indices(views: int, artefact_views: int, use_standard: bool = True, use_artefacts: bool = True) -> np.ndarray:
    """Which cached views a recipe may draw in training (view 0, the clean image, is always allowed)."""
    chosen = [0]
    if use_standard:
        chosen += list(range(1, 1 + views))
    if use_artefacts:
        chosen += list(range(1 + views, 1 + views + artefact_views))
    return np.array(chosen, dtype=np.int64)


_PREPARED: dict[str, np.ndarray] = {}


#: Kinds of cached view; the position seeds each view's augmentation, so new kinds go at the end.
VIEW_KINDS = ("clean", "standard", "artefact", "flipped")


def view_kinds(views: int, artefact_views: int, flipped: bool = False) -> list[tuple[str, int]]:
    """(kind, number) of every cached view in cache order: the clean image, standard, artefact views, then the
    clean image mirrored (``flipped``, for test-time augmentation)."""
    kinds = [("clean", 0)] + [("standard", j) for j in range(views)] + [("artefact", j) for j in range(artefact_views)]
    return [*kinds, ("flipped", 0)] if flipped else kinds


def _view_image(args: tuple[int, str, str, str, int, dict[str, Any], int]) -> np.ndarray:
    """One view of image ``i`` (runs in a worker process)."""
    i, path, prepared_path, kind, number, cfg, seed = args
    config = PreprocessConfig.from_dict(cfg)
    if prepared_path not in _PREPARED:
        _PREPARED[prepared_path] = np.load(prepared_path, mmap_mode="r")
    clean = np.asarray(_PREPARED[prepared_path][i])
    rng = np.random.default_rng((seed, i, VIEW_KINDS.index(kind), number))
    if kind == "clean":
        return clean
    if kind == "flipped":
        return np.ascontiguousarray(clean[:, ::-1])
    if kind == "standard":
        return augment(clean, rng, config.mask_margin)
    decoded = load_image(path, min_side=config.decode_min_side)
    degraded = dataclasses.replace(decoded, rgb=fundus_artefacts(decoded.rgb, rng))
    try:
        image = prepare_fundus(degraded, config).model_image
    except Exception:
        image = clean
    return augment(image, rng, config.mask_margin)


class ViewStack:
    """N x V x C x h x w features, one memory-mapped file per view, indexed like one array: ``stack[i, v]``."""

    def __init__(self, views: list[np.ndarray]) -> None:
        if not views:
            raise ValueError("no cached views")
        self.views = views
        self.shape = (len(views[0]), len(views), *views[0].shape[1:])

    def __getitem__(self, index: tuple[int, int]) -> np.ndarray:
        i, v = index
        return np.asarray(self.views[v][i])

    def __len__(self) -> int:
        return self.shape[0]


def _one_view(
    samples: Sequence[Sample],
    prepared_path: Path,
    config: PreprocessConfig,
    kind: str,
    number: int,
    seed: int,
    session: Any,
    pool: ProcessPoolExecutor,
    target: Path,
    batch_size: int,
) -> None:
    cfg = config.to_dict()
    jobs = [(i, str(s.path), str(prepared_path), kind, number, cfg, seed) for i, s in enumerate(samples)]
    out: np.memmap[Any, Any] | None = None
    chunk = 256
    results = pool.map(_view_image, jobs[:chunk], chunksize=8)
    for start in range(0, len(jobs), chunk):
        current = list(results)
        if start + chunk < len(jobs):
            # Submitted before this chunk runs through the stem, so workers augment while ONNX Runtime works.
            results = pool.map(_view_image, jobs[start + chunk : start + 2 * chunk], chunksize=8)
        for b in range(0, len(current), batch_size):
            feats = session.run(None, {"input": batch_tensor(current[b : b + batch_size], config)})[0]
            if out is None:
                out = np.lib.format.open_memmap(
                    target.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=(len(jobs), *feats.shape[1:])
                )
            out[start + b : start + b + len(feats)] = feats.astype(np.float16)
        log.info("stem features, %s view %d: %d/%d images", kind, number, min(start + chunk, len(jobs)), len(jobs))
    assert out is not None
    out.flush()
    del out
    target.with_suffix(".tmp.npy").rename(target)


def stem_features(
    samples: Sequence[Sample],
    images: np.ndarray,
    stem_onnx: Path,
    config: PreprocessConfig,
    views: int,
    cache_dir: Path,
    key_parts: Sequence[object],
    artefact_views: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    threads: int = 2,
    flipped: bool = False,
) -> ViewStack:
    """N x (1 + views + artefact_views) x C x h x w float16 stem features (layout: module docstring).

    Each view is its own cache file, computed in the order clean, then standard and artefact views interleaved,
    so a long cache build stopped early still leaves whole views, and adding views later reuses the others.
    Each source's views are cached on their own and joined (as :func:`prepared_images`). ``images`` must be the
    memory-mapped array returned by :func:`prepared_images` (workers re-open it by path); the cache key is the
    samples' paths followed by ``key_parts``.
    """
    import onnxruntime as ort

    prepared_path = Path(getattr(images, "filename", "") or "")
    if not prepared_path.is_file():
        raise ValueError("stem_features needs the memory-mapped prepared images (from prepared_images)")
    kinds = view_kinds(views, artefact_views, flipped)
    full_key = [[str(s.path) for s in samples], *key_parts]

    def target(kind: str, number: int) -> Path:
        version = ARTEFACTS_VERSION if kind == "artefact" else 0
        return cache_dir / f"stem-{_key(full_key, kind, number, version, seed, images.shape)}.npy"

    missing = [k for k in kinds if not target(*k).exists()]
    runs = source_runs(samples)
    if missing and len(runs) > 1:
        stacks = [
            stem_features(
                samples[a:b],
                prepared_images(samples[a:b], config, cache_dir, threads),
                stem_onnx,
                config,
                views,
                cache_dir,
                key_parts,
                artefact_views=artefact_views,
                seed=seed,
                batch_size=batch_size,
                threads=threads,
                flipped=flipped,
            )
            for a, b in runs
        ]
        for v, view in enumerate(kinds):
            if view in missing:
                _concatenate([stack.views[v] for stack in stacks], target(*view))
        missing = []
    # Interleave standard and artefact views so both kinds grow together.
    missing.sort(key=lambda k: (k[0] != "clean", k[1], k[0]))
    if missing:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            # The pool forks before ONNX Runtime's threads exist.
            pool.submit(int, 0).result()
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(stem_onnx), options, providers=["CPUExecutionProvider"])
            for kind, number in missing:
                _one_view(
                    samples, prepared_path, config, kind, number, seed, session, pool, target(kind, number), batch_size
                )
    return ViewStack([np.load(target(*k), mmap_mode="r") for k in kinds])


def advance_features(
    stack: ViewStack,
    blocks: Any,
    cache_dir: Path,
    key_parts: Sequence[object],
    batch_size: int = 64,
) -> ViewStack:
    """Run frozen ``blocks`` (a torch module) over cached features: frozen-k features become frozen-k' ones.

    On a CPU the stem is the cost; a deeper frozen split reuses the shallower cache instead of re-running it.
    """
    import torch

    blocks = blocks.eval()
    views = []
    for v in range(stack.shape[1]):
        # Keyed by the source view's own cache file, so adding views later reuses the ones advanced already.
        origin = Path(getattr(stack.views[v], "filename", "") or f"view{v}").name
        target = cache_dir / f"stem-{_key(list(key_parts), 'advanced', origin)}.npy"
        if not target.exists():
            source = stack.views[v]
            out: np.memmap[Any, Any] | None = None
            with torch.no_grad():
                for start in range(0, len(source), batch_size):
                    x = torch.from_numpy(np.asarray(source[start : start + batch_size], dtype=np.float32))
                    y = blocks(x).numpy()
                    if out is None:
                        out = np.lib.format.open_memmap(
                            target.with_suffix(".tmp.npy"),
                            mode="w+",
                            dtype=np.float16,
                            shape=(len(source), *y.shape[1:]),
                        )
                    out[start : start + len(y)] = y.astype(np.float16)
            assert out is not None
            out.flush()
            del out
            target.with_suffix(".tmp.npy").rename(target)
            log.info("advanced cached view %d of %d", v + 1, stack.shape[1])
        views.append(np.load(target, mmap_mode="r"))
    return ViewStack(views)
