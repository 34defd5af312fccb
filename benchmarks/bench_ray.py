"""Images/s of the local engine and of the Ray engine with 1 and 2 model actors, on one machine.

Copies ``--images`` camera photos (EyePACS-768 by default) into a temporary folder, then times:

* the local engine (``GradingPipeline.grade_paths``, what the CLI runs: prepare threads + model batches,
  each record written to a CSV as it finishes), model already loaded;
* the Ray engine on a private local cluster of ``--cpus`` CPUs, ``--workers`` model actors each, into a
  fresh output folder (the whole ``grade_archive`` call: listing, hashing, shards, merge, summary), after
  one small warm-up run so that Ray's own start-up is not counted;
* how the CPU time splits between preparing and the model, in one thread (it sets the actors per node);
* the Ray engine on 8 of the images, to split its time into a fixed cost per run (actors starting, the
  model loading, the merge) and a marginal cost per image, the number that scales.

The three are interleaved for ``--rounds`` rounds (other jobs on a shared machine change the CPU left to
this one). It also samples the memory (PSS and RSS) of the Ray worker processes by process title, and checks
that both engines wrote the same CSV. Linux only (reads /proc).

    python benchmarks/bench_ray.py [--data ../shared/data/eyepacs-768/images] [--images 300] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RaySampler(threading.Thread):
    """Samples this process's descendants (Ray's GCS, raylet and workers) every 0.2 s from /proc.

    Keeps the peak memory of each worker kind (its process title) and the CPU time all of them used. RSS
    counts every page of Ray's shared-memory object store a worker has mapped; PSS splits shared pages among
    the processes mapping them, closer to what one more actor costs a node. CPU time, unlike wall time,
    hardly depends on what else the machine runs, so it gives the throughput per vCPU on a quiet node.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peaks: dict[str, tuple[float, float]] = {}
        self._ticks: dict[int, tuple[int, int]] = {}  # pid -> (first seen, last seen) utime+stime
        self._own_cpu = 0.0  # this thread's CPU time, to subtract from the driver's
        self._lock = threading.Lock()

    def cpu_seconds(self) -> float:
        """CPU seconds used by the descendants since they were first seen, plus this process's, less mine."""
        with self._lock:
            ticks = sum(last - first for first, last in self._ticks.values())
            return ticks / os.sysconf("SC_CLK_TCK") + time.process_time() - self._own_cpu

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.thread_time()
            self._scan()
            with self._lock:
                self._own_cpu += time.thread_time() - start
            self.stop.wait(0.2)

    def _scan(self) -> None:
        parents: dict[int, int] = {}
        stats: dict[int, tuple[str, int]] = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = (title, int(fields[11]) + int(fields[12]))
        mine = {os.getpid()}
        changed = True
        while changed:
            grown = {pid for pid, parent in parents.items() if parent in mine} - mine
            changed = bool(grown)
            mine |= grown
        mine.discard(os.getpid())
        with self._lock:
            for pid in mine:
                title, ticks = stats[pid]
                first, _ = self._ticks.get(pid, (ticks, ticks))
                self._ticks[pid] = (first, ticks)
                if title.startswith("ray::"):
                    try:
                        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                    except OSError:
                        continue
                    sizes = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in rollup.splitlines()[1:]}
                    kind = title.split(" ")[0].split(".")[0]
                    pss, rss = self.peaks.get(kind, (0.0, 0.0))
                    self.peaks[kind] = (max(pss, sizes.get("Pss", 0.0)), max(rss, sizes.get("Rss", 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/eyepacs-768/images")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of local, ray x1, ray x2")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind the cluster to loopback

    import ray

    from retinagrade.cluster.engine import ClusterOptions, grade_archive
    from retinagrade.pipeline import GradingPipeline
    from retinagrade.report import open_writer, to_record

    sources = sorted(p for p in args.data.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not sources:
        sys.exit(f"no images in {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i in range(args.images):
            src = sources[i % len(sources)]
            shutil.copyfile(src, folder / f"{i:04d}_{src.name}")
        files = sorted(folder.iterdir())
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"files: {len(files)} from {args.data} ({megabytes:.0f} MB); machine: {os.cpu_count()} CPUs")

        print(f"load average at start (1, 5, 15 min): {os.getloadavg()}")
        # How the CPU splits between the two stages, in one thread: this sets the actors per node.
        single = GradingPipeline.load(args.model, threads=1)
        sample = files[:64]
        cpu = time.process_time()
        requests = [single.prepare(p.read_bytes()) for p in sample]
        prepare_ms = (time.process_time() - cpu) / len(sample) * 1000
        cpu = time.process_time()
        for i in range(0, len(requests), 8):
            single.infer(requests[i : i + 8])
        model_ms = (time.process_time() - cpu) / len(sample) * 1000
        share = model_ms / (model_ms + prepare_ms)
        print(
            f"stages in one thread, {len(sample)} images: prepare {prepare_ms:.1f} ms CPU/image, model (batches of 8) "
            f"{model_ms:.1f} ms CPU/image: the model is {share:.0%} of the CPU -> about {share * 15:.0f} actors "
            "of 1 CPU on a 16-vCPU node (one vCPU left to Ray)"
        )
        pipeline = GradingPipeline.load(args.model, threads=2)
        local_csv = Path(tmp) / "local.csv"
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        sampler = RaySampler()
        sampler.start()
        rates: dict[str, list[float]] = defaultdict(list)
        cpu_ms: dict[str, list[float]] = defaultdict(list)
        try:
            small = Path(tmp) / "small"
            small.mkdir()
            for src in files[:8]:
                shutil.copyfile(src, small / src.name)
            grade_archive([small], Path(tmp) / "warm-up", ClusterOptions(model=args.model))
            for round_ in range(args.rounds):
                # Interleaved, because other jobs on a shared machine change the CPU left to this one.
                start, cpu = time.perf_counter(), sampler.cpu_seconds()
                writer = open_writer(local_csv, overwrite=True)
                for path, outcome in pipeline.grade_paths(files, workers=2):
                    writer.write(to_record(path, outcome))
                writer.close()
                local_s = time.perf_counter() - start
                local_cpu_ms = (sampler.cpu_seconds() - cpu) / len(files) * 1000
                local_ms = local_s / len(files) * 1000
                rates["local"].append(len(files) / local_s)
                cpu_ms["local"].append(local_cpu_ms)
                print(
                    f"[round {round_ + 1}] local engine (2 prepare threads, 2 ONNX threads): {local_s:.1f} s -> "
                    f"{len(files) / local_s:.1f} images/s, {local_ms:.1f} ms/image; CPU {local_cpu_ms:.1f} ms/image"
                )
                for workers in (1, 2):
                    # Leave one CPU of the cluster to the prepare tasks whatever the number of actors.
                    cpus_per_worker = min(1.0, (args.cpus - 1) / workers)
                    options = ClusterOptions(
                        model=args.model, workers=workers, cpus_per_worker=cpus_per_worker, write_csv=True
                    )
                    start, cpu = time.perf_counter(), sampler.cpu_seconds()
                    grade_archive([small], Path(tmp) / f"fixed-{workers}-{round_}", options)
                    fixed_s = time.perf_counter() - start
                    fixed_cpu = sampler.cpu_seconds() - cpu
                    out = Path(tmp) / f"ray-{workers}-{round_}"
                    start, cpu = time.perf_counter(), sampler.cpu_seconds()
                    report = grade_archive([folder], out, options)
                    ray_s = time.perf_counter() - start
                    ray_cpu = sampler.cpu_seconds() - cpu
                    marginal_cpu_ms = (ray_cpu - fixed_cpu) / (len(files) - 8) * 1000
                    cpu_ms[f"ray x{workers}"].append(marginal_cpu_ms)
                    same = (out / "results.csv").read_text() == local_csv.read_text()
                    rates[f"ray x{workers}"].append(len(files) / ray_s)
                    # Marginal cost of one more image: the slope between the 8-image and the full run.
                    marginal_ms = (ray_s - fixed_s) / (len(files) - 8) * 1000
                    print(
                        f"[round {round_ + 1}] ray, {workers} actor(s) x {cpus_per_worker:g} CPU on a "
                        f"{args.cpus}-CPU cluster: {ray_s:.1f} s -> {len(files) / ray_s:.1f} images/s; 8 images: "
                        f"{fixed_s:.1f} s; marginal {marginal_ms:.1f} ms/image (local {local_ms:.1f}: "
                        f"{marginal_ms - local_ms:+.1f} ms/image), fixed ~{fixed_s - 8 * marginal_ms / 1000:.1f} "
                        f"s/run; CPU {ray_cpu / len(files) * 1000:.1f} ms/image, marginal {marginal_cpu_ms:.1f} "
                        f"(local {local_cpu_ms:.1f}); same CSV as local: {same}; statuses {report.summary['by_status']}"
                    )
        finally:
            sampler.stop.set()
            sampler.join()
            ray.shutdown()
        print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
        for name, values in rates.items():
            per_cpu = 1000 / min(cpu_ms[name])
            print(
                f"{name}: images/s per round {[round(v, 1) for v in values]}, best {max(values):.1f}; CPU ms/image "
                f"{[round(v, 1) for v in cpu_ms[name]]} -> {per_cpu:.1f} images/s per busy vCPU"
            )
        for kind, (pss, rss) in sorted(sampler.peaks.items()):
            if kind.startswith(("ray::MapWorker", "ray::MapBatches")):
                print(f"peak memory {kind}: PSS {pss:.0f} MiB, RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
