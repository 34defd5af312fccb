"""The grading service over HTTP on loopback against the floor, interleaved, on full-size camera JPEGs.

Starts ``uvicorn retinagrade.api.app:create_app`` on 127.0.0.1 (or targets ``--url``, which must be a loopback
address) and uploads the same 4288x2848 photos as ``bench_grade_cli.py`` (``camera_photos.py``). Each round
times, one after the other:

* the floor's throughput (``floor.py``: the shipped model after a Pillow-draft decode and a plain resize, 2
  worker processes, start-up included) and the service at concurrency 8: service images/s as a share of the
  floor's;
* the floor's latency (``floor.py --latency``: one process, 2 threads, one image at a time) and the service
  at concurrency 1: floor p95 / service p95, the service's speed as a share of the floor's.

While the service runs, nothing else of this benchmark does (its clients wait on the network). ``cpu`` is
the server's user + system seconds per image against the floor's (less sensitive than wall time to other
load on the machine). Then, with ``--memory-requests``, the server's RSS after each quarter of that many
requests, to show a leak (it keeps climbing) from allocator warm-up (it levels off).

    python benchmarks/bench_service.py [--rounds 3] [--requests 60] [--memory-requests 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from camera_photos import camera_photos

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int | None) -> float:
    """User + system seconds of a process and its reaped children (NaN when unknown)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, env_overrides: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RETINAGRADE_LOG_LEVEL": "WARNING", **env_overrides}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "retinagrade.api.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.terminate()
    raise SystemExit("the server did not become ready in 120 s")


def run(url: str, images: list[bytes], requests: int, concurrency: int, multipart: bool) -> dict[str, float]:
    """Send ``requests`` uploads with ``concurrency`` clients; returns latency percentiles and images/s."""
    latencies: list[float] = []
    errors = 0

    def worker(offset: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(offset, requests, concurrency):
                data = images[i % len(images)]
                start = time.perf_counter()
                if multipart:
                    response = client.post("/v1/grade", files={"file": ("eye.jpeg", data, "image/jpeg")})
                else:
                    response = client.post("/v1/grade", content=data, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "images_per_s": len(ordered) / elapsed,
        "errors": errors,
    }


def floor(folder: Path, *options: str) -> tuple[dict[str, float], float, float]:
    """``floor.py`` as a whole process: its JSON line, its wall seconds and its CPU seconds.

    It runs the model the server serves: ``RETINAGRADE_MODEL`` when that names a spec, else the shipped one.
    """
    served = os.environ.get("RETINAGRADE_MODEL", "")
    model = ["--model", served] if served.endswith(".json") else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, str(HERE / "floor.py"), str(folder), *model, *options]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, cpu


def summary(name: str, values: list[float]) -> str:
    return f"{name}: median {statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Target a running server (loopback only) instead of starting one.")
    parser.add_argument("--pid", type=int, help="With --url: the server's pid, for its CPU time and RSS.")
    parser.add_argument("--photos", type=int, default=60, help="Full-size photos (camera_photos.py).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of floor and service.")
    parser.add_argument("--requests", type=int, default=60, help="Requests per service run (one per photo).")
    parser.add_argument("--memory-requests", type=int, default=0, help="Requests for the memory check.")
    parser.add_argument("--multipart", action="store_true", help="Upload as multipart (default: raw body).")
    parser.add_argument("--batching", choices=["on", "off"], help="Set RETINAGRADE_BATCHING for the server.")
    args = parser.parse_args()

    paths = camera_photos(args.photos)
    folder = paths[0].parent
    images = [p.read_bytes() for p in paths]
    server = None
    if args.url:
        if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("benchmarks only target loopback (127.0.0.1)")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        env = {"RETINAGRADE_AUDIT_PATH": f"/tmp/retinagrade-bench-{port}.sqlite3"}
        if args.batching:
            env["RETINAGRADE_BATCHING"] = "true" if args.batching == "on" else "false"
        server = start_server(port, env)
        url, pid = f"http://127.0.0.1:{port}", server.pid
    figures: dict[str, list[float]] = {}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            model = client.get("/health/ready").json().get("model", {})
            for data in dict.fromkeys(images):  # warm the code paths once per distinct photo
                client.post("/v1/grade", content=data, headers={"Content-Type": "image/jpeg"})
        print(
            f"server {url}  model {model.get('name')} {model.get('version')}  cpus {os.cpu_count()}  "
            f"load {os.getloadavg()[0]:.1f}  batching {args.batching or 'default'}  "
            f"upload {'multipart' if args.multipart else 'raw'}; {len(images)} photos 4288x2848 in {folder}"
        )
        for round_ in range(1, args.rounds + 1):
            got, floor_wall, floor_cpu = floor(folder)
            floor_rate = got["images"] / floor_wall
            cpu_before = cpu_seconds(pid)
            c8 = run(url, images, args.requests, 8, args.multipart)
            server_cpu = (cpu_seconds(pid) - cpu_before) / args.requests
            latency, _, _ = floor(folder, "--latency")
            c1 = run(url, images, args.requests, 1, args.multipart)
            values = {
                "c=8 share": c8["images_per_s"] / floor_rate,
                "c=8 cpu share": (floor_cpu / got["images"]) / server_cpu,
                "c=1 p95 share": latency["p95_ms"] / c1["p95_ms"],
                "c=8 images/s": c8["images_per_s"],
                "floor images/s": floor_rate,
                "c=1 p95 ms": c1["p95_ms"],
                "floor p95 ms": latency["p95_ms"],
            }
            for key, value in values.items():
                figures.setdefault(key, []).append(value)
            print(
                f"round {round_}: c=8 {c8['images_per_s']:.1f} images/s vs floor {floor_rate:.1f} "
                f"-> {values['c=8 share']:.0%} (cpu/image {1000 * server_cpu:.0f} ms vs "
                f"{1000 * floor_cpu / got['images']:.0f} ms -> {values['c=8 cpu share']:.0%}); "
                f"c=1 p95 {c1['p95_ms']:.0f} ms (p50 {c1['p50_ms']:.0f}) vs floor p95 {latency['p95_ms']:.0f} ms "
                f"-> {values['c=1 p95 share']:.0%}; errors {c8['errors'] + c1['errors']:.0f}",
                flush=True,
            )
        print(f"load {os.getloadavg()[0]:.1f} at the end")
        for key, values in figures.items():
            scale = 100.0 if "share" in key else 1.0
            print(summary(key + (" %" if "share" in key else ""), [scale * v for v in values]))
        if pid is not None and args.memory_requests > 0:
            readings = [rss_mib(pid)]
            quarter = max(1, args.memory_requests // 4)
            errors = 0.0
            for _ in range(4):
                errors += run(url, images, quarter, 8, args.multipart)["errors"]
                readings.append(rss_mib(pid))
            steps = " -> ".join(f"{r:.0f}" for r in readings)
            print(f"memory: RSS MiB every {quarter} requests at c=8: {steps}  (errors {errors:.0f})")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
