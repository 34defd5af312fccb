"""Median milliseconds per preprocessing stage on raw camera JPEGs.

Stages are timed interleaved (every stage once per image per round) so that drift of a shared machine hits
them alike. Usage::

    python benchmarks/bench_preprocess.py [--data ../shared/data/raw-fundus-samples] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from retinagrade.preprocessing.decode import decode_image
from retinagrade.preprocessing.fundus import crop_to_fundus, enhance_local_contrast, locate_fundus, to_tensor

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw-fundus-samples"


class _Stopwatch:
    """Appends the milliseconds since the previous lap to the named stage."""

    def __init__(self) -> None:
        self.timings: dict[str, list[float]] = defaultdict(list)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage].append((now - self._last) * 1000.0)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the JPEGs (or images/)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="model spec whose preprocessing to time")
    args = parser.parse_args()
    folder = args.data / "images" if (args.data / "images").is_dir() else args.data
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"No JPEGs in {folder}")
    blobs = [p.read_bytes() for p in files]
    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.pipeline import DEFAULT_MODEL

    config = ModelSpec.load(args.model or DEFAULT_MODEL, verify_checksum=False).preprocess
    print(f"preprocessing of the model spec: input {config.input_size} px, decode_min_side {config.decode_min_side}")
    watch = _Stopwatch()
    reduced = f"decode min_side={config.decode_min_side}"
    for _ in range(args.rounds):
        for data in blobs:
            watch.start()
            decode_image(data)
            watch.lap("decode full")
            rgb = decode_image(data, min_side=config.decode_min_side).rgb
            watch.lap(reduced)
            geometry = locate_fundus(rgb)
            watch.lap("locate")
            crop = crop_to_fundus(rgb, geometry, config.input_size)
            watch.lap("crop")
            image = enhance_local_contrast(
                crop,
                sigma_fraction=config.contrast_sigma,
                weight=config.contrast_weight,
                mask_margin=config.mask_margin,
            )
            watch.lap("enhance")
            to_tensor([image], config.mean, config.std)
            watch.lap("to_tensor")
    sizes = sorted({f"{len(b) // 1024} KiB" for b in blobs})
    print(f"{len(files)} JPEGs in {folder} ({', '.join(sizes)}), {args.rounds} rounds, size {config.input_size}")
    for stage, values in watch.timings.items():
        median = statistics.median(values)
        print(f"{stage:24s} median {median:8.2f} ms   (min {min(values):.2f}, n={len(values)})")


if __name__ == "__main__":
    main()
