"""``retinagrade grade`` against the floor, as whole processes, interleaved, on full-size camera JPEGs.

Each round times, one after the other: the floor (``floor.py``: the shipped model after a Pillow-draft decode
and a plain resize, 2 worker processes) and ``retinagrade grade`` on the same ``--images`` 4288x2848 photos
(``camera_photos.py``), then both again on one photo (their start-up, with one image). Every figure is a whole
process: interpreter start, imports, model loading, the CSV written. A round's ratio is floor time / product
time, the product's speed as a share of the floor's; interleaving keeps it meaningful when a shared machine's
speed drifts. Prints each round, then the median and the spread; ``cpu`` is user + system seconds of the
process and its children (less sensitive than wall time to other load on the machine).

    python benchmarks/bench_grade_cli.py [--images 60] [--rounds 5] [--workers N --threads N]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from camera_photos import camera_photos

HERE = Path(__file__).resolve().parent


def timed(command: Sequence[str]) -> tuple[float, float]:
    """Wall and CPU (user + system, children included) seconds of one run; exits if the command fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def product_command() -> list[str]:
    script = Path(sys.executable).with_name("retinagrade")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "retinagrade.cli"]


def summary(name: str, values: list[float], unit: str = "") -> str:
    return f"{name} median {statistics.median(values):.3g}{unit} (min {min(values):.3g}, max {max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="retinagrade grade --workers (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="retinagrade grade --threads (default: its own)")
    parser.add_argument("--model", type=Path, default=None, help="model spec for both (default: the shipped model)")
    args = parser.parse_args()
    folders = {"run": camera_photos(args.images)[0].parent, "start-up": camera_photos(1)[0].parent}
    options = [f"--{name}={value}" for name, value in (("workers", args.workers), ("threads", args.threads)) if value]
    model = ["--model", str(args.model)] if args.model else []
    out = Path(tempfile.mkdtemp(prefix="retinagrade-bench-"))
    floor_cmd = [sys.executable, str(HERE / "floor.py"), *model]
    grade_cmd = [*product_command(), "grade", "--overwrite", "--quiet", *options, *model]
    print(
        f"{args.images} photos 4288x2848 in {folders['run']}; cpus {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f} at the start; product: {' '.join(grade_cmd[:2])} {' '.join(options)}"
    )
    figures: dict[str, list[float]] = {}
    try:
        for round_ in range(1, args.rounds + 1):
            line = [f"round {round_}:"]
            for label, folder in folders.items():
                floor_wall, floor_cpu = timed([*floor_cmd, str(folder)])
                grade_wall, grade_cpu = timed([*grade_cmd, "-o", str(out / f"{label}.csv"), str(folder)])
                for key, value in (
                    (f"{label} floor s", floor_wall),
                    (f"{label} grade s", grade_wall),
                    (f"{label} ratio", floor_wall / grade_wall),
                    (f"{label} cpu ratio", floor_cpu / grade_cpu),
                ):
                    figures.setdefault(key, []).append(value)
                line.append(
                    f"{label}: floor {floor_wall:.2f} s, grade {grade_wall:.2f} s -> {floor_wall / grade_wall:.0%} "
                    f"of the floor (cpu {floor_cpu:.2f} / {grade_cpu:.2f} s -> {floor_cpu / grade_cpu:.0%});"
                )
            print(" ".join(line), flush=True)
        with (out / "run.csv").open(newline="") as fh:
            statuses = Counter(row["status"] for row in csv.DictReader(fh))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"statuses of the last {args.images}-photo run: {dict(statuses)}; load {os.getloadavg()[0]:.1f} at the end")
    n = args.images
    run_floor, run_grade = statistics.median(figures["run floor s"]), statistics.median(figures["run grade s"])
    print(f"{n} photos: floor {n / run_floor:.1f} images/s, retinagrade grade {n / run_grade:.1f} images/s (medians)")
    print(summary(f"{n} photos, product as a share of the floor:", [100 * r for r in figures["run ratio"]], "%"))
    print(summary(f"{n} photos, cpu share:", [100 * r for r in figures["run cpu ratio"]], "%"))
    print(summary("start-up (1 photo), floor s:", figures["start-up floor s"]))
    print(summary("start-up (1 photo), grade s:", figures["start-up grade s"]))
    print(summary("start-up, product as a share of the floor:", [100 * r for r in figures["start-up ratio"]], "%"))


if __name__ == "__main__":
    main()
