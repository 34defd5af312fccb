"""Throughput of ``retinagrade grade`` on a folder of full-size camera JPEGs, whole run included.

Copies the raw camera samples (2560x1920 to 3888x2592) into a temporary folder until it holds ``--images``
files, runs the CLI once as a user would (process start, model load, CSV written) and prints images/s.

    python benchmarks/bench_grade_cli.py [--data ../shared/data/raw-fundus-samples/images] [--images 120]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/raw-fundus-samples/images")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    sources = sorted(p for p in args.data.glob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if not sources:
        sys.exit(f"no JPEGs in {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i in range(args.images):
            src = sources[i % len(sources)]
            shutil.copyfile(src, folder / f"{i:04d}_{src.name}")
        megapixels = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        out = Path(tmp) / "results.csv"
        command = [
            str(Path(sys.executable).with_name("retinagrade")),
            "grade",
            str(folder),
            "-o",
            str(out),
            "--quiet",
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads),
        ]
        if args.model is not None:
            command += ["--model", str(args.model)]
        start = time.perf_counter()
        subprocess.run(command, check=False)
        elapsed = time.perf_counter() - start
        with out.open() as fh:
            statuses = Counter(row["status"] for row in csv.DictReader(fh))
    print(f"files: {args.images} camera JPEGs ({megapixels:.0f} MB) from {args.data}")
    print(f"statuses: {dict(statuses)}")
    print(
        f"whole run: {elapsed:.1f} s -> {args.images / elapsed:.1f} images/s "
        f"(workers={args.workers}, threads={args.threads})"
    )


if __name__ == "__main__":
    main()
