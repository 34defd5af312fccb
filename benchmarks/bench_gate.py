"""Milliseconds the gate adds per image: the learned fundus detector and the quality features.

Times, on already decoded images (decoding is the pipeline's cost either way), interleaved per round:
``detector`` = thumbnail + backbone (ONNX Runtime, 1 thread) + head; ``features`` = compute_quality_features;
``gate`` = assess_quality as the pipeline calls it (both plus the decision). Usage::

    python benchmarks/bench_gate.py [--data ../shared/data] [--rounds 5] [--per-folder 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from retinagrade.pipeline import DEFAULT_MODEL, GradingPipeline
from retinagrade.preprocessing.decode import decode_image
from retinagrade.preprocessing.pipeline import prepare_fundus
from retinagrade.preprocessing.quality import assess_quality, compute_quality_features

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOLDERS = ("raw-fundus-samples", "eyepacs-768", "aptos2019-224", "mexico-512", "non-fundus-2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-folder", type=int, default=8)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    pipeline = GradingPipeline.load(args.model, threads=1)
    detector = pipeline.detector
    if detector is None:
        raise SystemExit("this gate has no learned detector")
    config = pipeline.spec.preprocess
    items = []
    for folder in FOLDERS:
        images = sorted((args.data / folder / "images").glob("*"))[: args.per_folder]
        for path in images:
            decoded = decode_image(path.read_bytes(), min_side=config.decode_min_side)
            items.append((decoded, prepare_fundus(decoded, config)))
    if not items:
        raise SystemExit(f"no images under {args.data}")
    timings: dict[str, list[float]] = defaultdict(list)
    for decoded, prepared in items[:4]:  # warm-up
        assess_quality(decoded, prepared, pipeline.gate, detector)
    for _ in range(args.rounds):
        for decoded, prepared in items:
            start = time.perf_counter()
            detector.probability(decoded.rgb)
            mid = time.perf_counter()
            compute_quality_features(decoded, prepared)
            end = time.perf_counter()
            assess_quality(decoded, prepared, pipeline.gate, detector)
            done = time.perf_counter()
            timings["detector"].append((mid - start) * 1000.0)
            timings["features"].append((end - mid) * 1000.0)
            timings["gate"].append((done - end) * 1000.0)
    print(f"{len(items)} images x {args.rounds} rounds, detector input {detector.params.input_side} px, 1 thread")
    for stage, values in timings.items():
        values.sort()
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"{stage:10s} median {statistics.median(values):6.2f} ms   p90 {p90:6.2f} ms")


if __name__ == "__main__":
    main()
