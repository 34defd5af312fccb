"""Caches that make CPU training feasible: prepared images, and frozen-stem features of augmented views.

Prepared images go through exactly the serving code (``decode_image`` + ``prepare``). Stem features are
computed with ONNX Runtime (several times faster than eager PyTorch on CPU) from the exported frozen stem.
Cache files are keyed by a hash of everything that determines their content.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from retinagrade.preprocessing.decode import load_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, batch_tensor, prepare
from retinagrade.training.augment import augment
from retinagrade.training.data import Sample

log = logging.getLogger(__name__)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_one(args: tuple[str, dict]) -> np.ndarray:
    path, cfg = args
    config = PreprocessConfig.from_dict(cfg)
    decoded = load_image(path, min_side=config.decode_min_side)
    return prepare(decoded, config).model_image


def prepared_images(
    samples: Sequence[Sample], config: PreprocessConfig, cache_dir: Path, workers: int = 2
) -> np.ndarray:
    """N x S x S x 3 uint8 prepared model images, computed once and memory-mapped afterwards."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(s.path) for s in samples]
    target = cache_dir / f"prepared-{_key(paths, config.to_dict())}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
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


def stem_features(
    images: np.ndarray,
    stem_onnx: Path,
    config: PreprocessConfig,
    views: int,
    cache_dir: Path,
    key_parts: Sequence[object],
    seed: int = 0,
    batch_size: int = 32,
    threads: int = 2,
) -> np.ndarray:
    """N x V x C x h x w float16 stem features; view 0 is the unaugmented image, the others random augmentations."""
    import onnxruntime as ort

    target = cache_dir / f"stem-{_key(list(key_parts), views, seed, images.shape)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(stem_onnx), options, providers=["CPUExecutionProvider"])
    probe = session.run(None, {"input": batch_tensor([images[0]], config)})[0]
    shape = (len(images), views, *probe.shape[1:])
    out = np.lib.format.open_memmap(target.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=shape)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        for v in range(views):
            batch = []
            for i in range(start, stop):
                image = np.asarray(images[i])
                if v > 0:
                    image = augment(image, np.random.default_rng((seed, i, v)), config.mask_margin)
                batch.append(image)
            out[start:stop, v] = session.run(None, {"input": batch_tensor(batch, config)})[0].astype(np.float16)
        if (start // batch_size) % 10 == 0:
            log.info("stem features %d/%d images", stop, len(images))
    out.flush()
    del out
    target.with_suffix(".tmp.npy").rename(target)
    return np.load(target, mmap_mode="r")
