"""`retinagrade serve` as it runs in production: a subprocess on loopback, its two listeners, its start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

STARTUP_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, metrics_port: int) -> None:
        self.process = process
        self.port = port
        self.metrics_port = metrics_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "retinagrade.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture
def serve(model_spec_path: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: run ``retinagrade serve`` with extra RETINAGRADE_* variables until it is ready."""
    running: list[subprocess.Popen[str]] = []

    def start(**env: str) -> Served:
        port, metrics_port = _free_port(), _free_port()
        environment = {
            **os.environ,
            "RETINAGRADE_MODEL": str(model_spec_path),
            "RETINAGRADE_AUDIT_PATH": str(tmp_path / "audit.sqlite3"),
            "RETINAGRADE_METRICS_PORT": str(metrics_port),
            "RETINAGRADE_THREADS": "1",
            "RETINAGRADE_PREPARE_WORKERS": "1",
            "RETINAGRADE_LOG_LEVEL": "WARNING",
            **{f"RETINAGRADE_{key.upper()}": value for key, value in env.items()},
        }
        process = subprocess.Popen(
            _serve_command(port), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        running.append(process)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    return Served(process, port, metrics_port)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve did not become ready")

    yield start
    for process in running:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_metrics_are_on_their_own_listener(serve: Callable[..., Served]) -> None:
    served = serve()
    assert httpx.get(f"{served.url}/metrics", timeout=5).status_code == 404
    metrics = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5)
    assert metrics.status_code == 200
    assert "retinagrade_http_requests_total" in metrics.text
    assert httpx.get(f"http://127.0.0.1:{served.metrics_port}/v1/model", timeout=5).status_code == 404


def test_a_stalled_client_cannot_hold_the_shutdown(serve: Callable[..., Served]) -> None:
    # Only the shutdown bound may end this request: the body deadline is far away.
    served = serve(body_timeout_s="600", body_grace_s="600", shutdown_timeout_s="1")
    stalled = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    try:
        stalled.sendall(
            b"POST /v1/grade HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\xff" * 100
        )
        time.sleep(0.5)
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the service was still running 30 s after SIGTERM with one stalled client")
    finally:
        stalled.close()


def test_an_unusable_audit_path_stops_start_up_with_one_clear_line(model_spec_path: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    environment = {
        **os.environ,
        "RETINAGRADE_MODEL": str(model_spec_path),
        "RETINAGRADE_AUDIT_PATH": str(not_a_folder / "audit.sqlite3"),
        "RETINAGRADE_METRICS_PORT": str(_free_port()),
    }
    result = subprocess.run(
        _serve_command(_free_port()), env=environment, capture_output=True, text=True, timeout=STARTUP_S
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "cannot start the grading service" in result.stderr and "audit store" in result.stderr
    assert "RETINAGRADE_AUDIT_PATH" in result.stderr


def test_a_taken_metrics_port_stops_start_up_with_one_clear_line(model_spec_path: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        environment = {
            **os.environ,
            "RETINAGRADE_MODEL": str(model_spec_path),
            "RETINAGRADE_AUDIT_PATH": str(tmp_path / "audit.sqlite3"),
            "RETINAGRADE_METRICS_PORT": str(port),
        }
        result = subprocess.run(
            _serve_command(_free_port()), env=environment, capture_output=True, text=True, timeout=STARTUP_S
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and f"cannot listen for /metrics on 127.0.0.1:{port}" in result.stderr
