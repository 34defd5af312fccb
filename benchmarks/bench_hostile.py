"""Benchmark the service under hostile clients on loopback: slow uploads, huge batches, decompression bombs.

Starts the real server (``python -m retinagrade.cli serve``, the shipped model unless ``--model``) on 127.0.0.1
from the sources in ``--src`` (default: this checkout's ``src``; point it at another checkout, e.g. a worktree
of main, to measure the code before a change) and drives three scenarios, each on a fresh server:

a. ``--slow-clients`` connections (default 32) that send a request head and then 1 byte/s, reconnecting when
   the server drops them, while one good client grades a real photo every 0.25 s: the good requests'
   statuses and latency.
b. six concurrent batches of 16 x 16 MiB (a real JPEG padded with trailing bytes, which decoders ignore):
   the statuses and the server's peak RSS.
c. four concurrent 7999 x 7999 PNGs (small files, large canvases): statuses and the server's peak RSS.

Peak RSS is the kernel's high-water mark (``VmHWM``, reset through ``/proc/PID/clear_refs`` before each
scenario where allowed) and, as a cross-check, the highest ``VmRSS`` sampled every 20 ms. Every loop is
bounded in count and time; a run takes about two minutes.

    .venv/bin/python benchmarks/bench_hostile.py                                # this checkout
    git worktree add /tmp/before main
    .venv/bin/python benchmarks/bench_hostile.py --src /tmp/before/src --json before.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "raw-fundus-samples" / "images"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` memory line in MiB (nan once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running_server(src: Path, model: Path, workdir: Path) -> Iterator[Server]:
    """The service from ``src`` on a free loopback port, until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "RETINAGRADE_MODEL": str(model),
        "RETINAGRADE_AUDIT_PATH": str(workdir / f"audit-{port}.sqlite3"),
        "RETINAGRADE_METRICS_PORT": str(free_port()),
        "RETINAGRADE_THREADS": "2",
        "RETINAGRADE_PREPARE_WORKERS": "2",
        "RETINAGRADE_LOG_LEVEL": "ERROR",
    }
    command = [sys.executable, "-m", "retinagrade.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode} during start-up")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready in 120 s")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield Server(process, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


class PeakRss:
    """The server's peak resident memory over a block: VmHWM (reset first when allowed) and sampled VmRSS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = proc_status(pid, "VmRSS")
        self.sampled = self.baseline
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = proc_status(self.pid, "VmRSS")
            if rss == rss:  # not nan
                self.sampled = max(self.sampled, rss)

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = proc_status(self.pid, "VmHWM") if self.hwm_reset else float("nan")

    def report(self) -> dict[str, float]:
        return {
            "rss_before_mib": round(self.baseline, 1),
            "peak_rss_mib": round(self.hwm if self.hwm == self.hwm else self.sampled, 1),
            "peak_rss_sampled_mib": round(self.sampled, 1),
        }


def read_status(sock: socket.socket, timeout: float) -> int | None:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else None


def head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- scenario a: slow clients ---------------------------------------------------------------------------------
@dataclass
class SlowClients:
    """``count`` connections trickling 1 byte/s, reconnecting when dropped; runs until stopped."""

    port: int
    count: int
    length: int
    answers: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(head("/v1/grade", "image/jpeg", self.length))
            return sock
        except OSError:
            self.answers["connect_failed"] += 1
            return None

    def run(self, seconds: float) -> None:
        socks = [self._connect() for _ in range(self.count)]
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if sock is None:
                    socks[i] = self._connect()
                    continue
                dropped = False
                if select.select([sock], [], [], 0)[0]:
                    status = read_status(sock, 1)
                    self.answers[str(status)] += 1
                    dropped = True
                else:
                    try:
                        sock.sendall(b"\xff")
                    except OSError:
                        self.answers["reset"] += 1
                        dropped = True
                if dropped:
                    sock.close()
                    socks[i] = self._connect()
            self._stop.wait(1.0)
        for sock in socks:
            if sock is not None:
                sock.close()

    def stop(self) -> None:
        self._stop.set()


def scenario_slow(server: Server, photo: bytes, slow_clients: int, seconds: float) -> dict[str, Any]:
    slow = SlowClients(server.port, slow_clients, len(photo))
    thread = threading.Thread(target=slow.run, args=(seconds + 10,), daemon=True)
    thread.start()
    time.sleep(2.0)  # every slow client connected and trickling
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=server.url, timeout=60) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = client.post("/v1/grade", content=photo, headers={"Content-Type": "image/jpeg"})
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - started) * 1000.0)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            time.sleep(0.25)
    slow.stop()
    thread.join(timeout=30)
    good = sum(statuses.values())
    return {
        "slow_clients": slow_clients,
        "seconds": seconds,
        "good_requests": good,
        "good_statuses": dict(statuses),
        "good_503": statuses.get("503", 0),
        "good_failed": good - statuses.get("200", 0),
        "good_latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "good_latency_ms_p95": round(percentile(latencies, 0.95), 1) if latencies else None,
        "slow_client_answers": dict(slow.answers),
    }


# -- scenario b: huge batches ---------------------------------------------------------------------------------
def send_batch(port: int, payload: bytes, files: int) -> str:
    """One multipart batch of ``files`` copies of ``payload``, streamed; the status, or how it ended."""
    boundary = "benchhostileboundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    closing = f"--{boundary}--\r\n".encode()
    length = files * (len(part) + len(payload) + 2) + len(closing)
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(head("/v1/grade/batch", f"multipart/form-data; boundary={boundary}", length))
        view = memoryview(payload)
        for _ in range(files):
            for chunk in (part, *(view[i : i + MIB] for i in range(0, len(view), MIB)), b"\r\n"):
                if select.select([sock], [], [], 0)[0]:  # answered before the body ended: refused early
                    return str(read_status(sock, 10))
                sock.sendall(chunk)
        sock.sendall(closing)
        return str(read_status(sock, 300))
    except OSError as exc:
        status = read_status(sock, 1)
        return str(status) if status else type(exc).__name__
    finally:
        sock.close()


def padded_jpeg(photo: bytes, size: int) -> bytes:
    return photo + b"\x00" * (size - len(photo))


def scenario_batches(server: Server, photo: bytes, batches: int, files: int, file_mib: int) -> dict[str, Any]:
    payload = padded_jpeg(photo, file_mib * MIB)
    with PeakRss(server.process.pid) as memory, ThreadPoolExecutor(batches) as pool:
        statuses = list(pool.map(lambda _: send_batch(server.port, payload, files), range(batches)))
    return {"batches": batches, "files": files, "file_mib": file_mib, "statuses": statuses, **memory.report()}


# -- scenario c: decompression cost ---------------------------------------------------------------------------
def big_canvas_png(side: int) -> bytes:
    """A mostly black ``side`` x ``side`` PNG with a fundus-coloured disc: a small file, a large canvas."""
    image = Image.new("RGB", (side, side))
    ImageDraw.Draw(image).ellipse((side // 8, side // 8, side * 7 // 8, side * 7 // 8), fill=(150, 60, 20))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def scenario_pngs(server: Server, png: bytes, count: int) -> dict[str, Any]:
    def post(_: int) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            response = httpx.post(
                f"{server.url}/v1/grade", content=png, headers={"Content-Type": "image/png"}, timeout=300
            )
            status = str(response.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return status, round((time.perf_counter() - started) * 1000.0, 1)

    with PeakRss(server.process.pid) as memory, ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(post, range(count)))
    return {
        "pngs": count,
        "png_kb": round(len(png) / 1024, 1),
        "statuses": [status for status, _ in answers],
        "latency_ms": [latency for _, latency in answers],
        **memory.report(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    photos = sorted(args.images.glob("*.jpeg"))
    if not photos:
        raise SystemExit(f"no *.jpeg photos in {args.images}")
    photo = photos[0].read_bytes()
    png = big_canvas_png(args.png_side)
    results: dict[str, Any] = {"src": str(args.src)}
    scenarios: list[tuple[str, Callable[[Server], dict[str, Any]]]] = [
        ("a_slow_clients", lambda s: scenario_slow(s, photo, args.slow_clients, args.slow_seconds)),
        ("b_batches", lambda s: scenario_batches(s, photo, 6, 16, 16)),
        ("c_pngs", lambda s: scenario_pngs(s, png, 4)),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as workdir:
        for name, scenario in scenarios:
            if args.only and name[0] not in args.only:
                continue
            started = time.perf_counter()
            with running_server(args.src, args.model, Path(workdir)) as server:
                results[name] = scenario(server)
            results[name]["wall_s"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="Source folder of the server to run.")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "retinagrade-dr.json")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Folder of real fundus JPEGs.")
    parser.add_argument("--slow-clients", type=int, default=32)
    parser.add_argument("--slow-seconds", type=float, default=30.0, help="How long the good client runs.")
    parser.add_argument("--png-side", type=int, default=7999)
    parser.add_argument("--only", default="", help="Scenario letters to run (default: abc).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
