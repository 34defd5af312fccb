"""The speed floor: the shipped ONNX model after the cheapest input path, on the same photos as the product.

What any grader of these photos must at least do: decode each JPEG at reduced scale in the DCT domain (Pillow
``draft``, with the product's rule: the smallest scale that keeps the shorter side >= the spec's
``decode_min_side``), resize the whole picture to the model's input with a plain bilinear resize, normalise
and run the shipped model. No field-of-view search, no contrast normalisation, no quality gate, no checksum,
no report: its answers are not gradings; only its time means something. It imports nothing but Pillow, numpy
and ONNX Runtime (not ``retinagrade``), so its start-up is the least those libraries allow.

Two modes, one for each figure of the product it is the yardstick of:

* throughput (default): ``--workers`` forked processes (2), one ONNX Runtime thread each, batch 1, start-up
  included when timed from outside as a whole process (``bench_grade_cli.py``, ``bench_service.py``);
* ``--latency``: one process, ``--threads`` ONNX Runtime threads (2), one image at a time after a warm-up,
  as a server answers one request at a time: per-image p50 and p95 (``bench_service.py`` at concurrency 1).

The last line printed is JSON (``images``, ``seconds``; ``p50_ms``, ``p95_ms`` with ``--latency``).

    python benchmarks/floor.py FOLDER [--model models/retinagrade-dr.json] [--workers 2] [--latency]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "models" / "retinagrade-dr.json"

_session: ort.InferenceSession | None = None
_config: dict[str, Any] = {}


def _load(model: str, preprocess: dict[str, Any], threads: int) -> None:
    """One ONNX Runtime session for this process (a worker's initialiser)."""
    global _session
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    _session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    _config.update(preprocess)


def _grade(path: str) -> int:
    """Decode at reduced scale, resize, normalise, run the model; returns the index of the largest logit."""
    assert _session is not None
    size = int(_config["input_size"])
    with Image.open(path) as img:
        width, height = img.size
        factor = max(1, min(width, height) // max(int(_config["decode_min_side"]), 1))
        if factor >= 2:
            img.draft("RGB", (width // factor, height // factor))
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = (np.asarray(rgb, np.float32) - np.asarray(_config["mean"], np.float32)) / np.asarray(_config["std"], np.float32)
    batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    outputs = _session.run(["logits"], {_session.get_inputs()[0].name: batch})
    return int(np.argmax(outputs[0][0]))


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of JPEGs (or one JPEG)")
    parser.add_argument("--model", type=Path, default=DEFAULT_SPEC, help="model spec (.json) beside its ONNX file")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (throughput mode)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (1 a worker; 2 latency)")
    parser.add_argument("--latency", action="store_true", help="one process, one image at a time: p50/p95")
    args = parser.parse_args()
    spec = json.loads(args.model.read_text(encoding="utf-8"))
    model = str(args.model.parent / spec["model_file"])
    if args.folder.is_dir():
        files = sorted(str(p) for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    else:
        files = [str(args.folder)]
    if not files:
        raise SystemExit(f"no JPEGs in {args.folder}")
    if args.latency:
        _load(model, spec["preprocess"], args.threads or 2)
        _grade(files[0])  # warm-up, as a server's start-up does
        times = []
        for path in files:
            began = time.perf_counter()
            _grade(path)
            times.append(1000.0 * (time.perf_counter() - began))
        ordered = sorted(times)
        p50, p95 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"floor latency: {len(files)} images one at a time: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        print(json.dumps({"images": len(files), "p50_ms": p50, "p95_ms": p95}))
        return
    # Forked: the workers inherit the imported libraries instead of importing them again.
    context = multiprocessing.get_context("fork")
    initargs = (model, spec["preprocess"], args.threads or 1)
    with context.Pool(args.workers, initializer=_load, initargs=initargs) as pool:
        grades = pool.map(_grade, files, chunksize=1)
    seconds = time.perf_counter() - start
    print(f"floor: {len(grades)} images in {seconds:.2f} s after the interpreter started")
    print(json.dumps({"images": len(grades), "seconds": seconds}))


if __name__ == "__main__":
    main()
