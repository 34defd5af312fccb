"""Benchmark the grading service over HTTP on loopback: latency, throughput and memory.

Starts ``uvicorn retinagrade.api.app:create_app`` on 127.0.0.1 (or targets ``--url``, which must be a
loopback address), uploads full-size camera JPEGs and a 4288x2848 JPEG made by upscaling a raw sample
(Pillow, quality 95), and prints p50/p95 latency and images/s at each concurrency, then the server's RSS
before and after ``--memory-requests`` requests.

    RETINAGRADE_MODEL=cache/dev-model/retinagrade-dr.json .venv/bin/python benchmarks/bench_service.py
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "raw-fundus-samples" / "images"


def big_jpeg(sample: Path) -> bytes:
    """A 4288 x 2848 camera-sized JPEG (quality 95) upscaled from a raw sample."""
    buffer = io.BytesIO()
    Image.open(sample).convert("RGB").resize((4288, 2848), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Target a running server (loopback only) instead of starting one.")
    parser.add_argument("--pid", type=int, help="With --url: the server's pid, to report its RSS.")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Folder of camera JPEGs.")
    parser.add_argument("--requests", type=int, default=100, help="Requests per latency run.")
    parser.add_argument("--concurrency", default="1,8", help="Comma-separated client counts.")
    parser.add_argument("--memory-requests", type=int, default=2000, help="Requests for the memory check.")
    parser.add_argument("--multipart", action="store_true", help="Upload as multipart (default: raw body).")
    parser.add_argument("--batching", choices=["on", "off"], help="Set RETINAGRADE_BATCHING for the server.")
    args = parser.parse_args()

    samples = sorted(args.images.glob("*.jp*g"))
    if not samples:
        raise SystemExit(f"no JPEGs in {args.images}")
    camera = [p.read_bytes() for p in samples]
    big = [big_jpeg(samples[0])]
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
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            model = client.get("/health/ready").json().get("model", {})
            for data in camera + big:  # warm the code paths once
                client.post("/v1/grade", content=data, headers={"Content-Type": "image/jpeg"})
        print(
            f"server {url}  model {model.get('name')} {model.get('version')}  cpus {os.cpu_count()}  "
            f"load {os.getloadavg()[0]:.1f}  batching {args.batching or 'default'}  "
            f"upload {'multipart' if args.multipart else 'raw'}"
        )
        print(f"4288x2848 JPEG: {len(big[0]) / 1e6:.1f} MB; camera JPEGs: {len(camera)} files")
        for name, images in (("4288x2848", big), ("camera", camera)):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                stats = run(url, images, args.requests, concurrency, args.multipart)
                print(
                    f"{name:>9}  c={concurrency:<2}  p50 {stats['p50_ms']:6.1f} ms  "
                    f"p95 {stats['p95_ms']:6.1f} ms  {stats['images_per_s']:5.1f} images/s  "
                    f"errors {stats['errors']:.0f}"
                )
        if pid is not None and args.memory_requests > 0:
            # RSS after each quarter: a leak keeps climbing, allocator warm-up levels off.
            readings = [rss_mib(pid)]
            quarter = max(1, args.memory_requests // 4)
            errors = 0.0
            for _ in range(4):
                errors += run(url, camera + big, quarter, 8, args.multipart)["errors"]
                readings.append(rss_mib(pid))
            steps = " -> ".join(f"{r:.0f}" for r in readings)
            print(f"memory: RSS MiB every {quarter} requests at c=8: {steps}  (errors {errors:.0f})")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
