"""Slow, stalled and vanishing clients against a real uvicorn server on loopback (raw sockets, bounded loops).

A client that trickles its body must not hold a place in the grading queue and is cut off (408) once it is
too slow; a body that does not fit the byte budget is refused before it is read; a client that goes away
mid-body is a 499, never a server error.
"""

from __future__ import annotations

import json
import re
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest


def request_head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_status(sock: socket.socket, timeout: float) -> int | None:
    """The status of the response on ``sock``, or None if none came within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError):
        pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else None


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def request_count(server: Any, route: str, status: str) -> float:
    text = generate_latest(server.app.state.metrics.registry).decode()
    wanted = ("retinagrade_http_requests_total{", f'route="{route}"', f'status="{status}"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(wanted[0]) and wanted[1] in line and wanted[2] in line
    )


def test_slow_uploads_hold_no_queue_place_and_get_408(live_server: Callable[..., Any], synthetic_jpeg: bytes) -> None:
    server = live_server(max_queue=2, body_grace_s=1.0, body_min_bytes_per_s=4096, body_timeout_s=20.0)
    slow = [server.connect() for _ in range(6)]  # three times the queue
    for sock in slow:
        sock.sendall(request_head("/v1/grade", "image/jpeg", 50_000))

    def good_requests() -> list[int]:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return [
                client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"}).status_code
                for _ in range(3)
            ]

    statuses: dict[int, int | None] = {}
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(good_requests)
        for _ in range(100):  # 1 byte per slow client every 0.1 s, for at most 10 s
            for index, sock in enumerate(slow):
                if index in statuses:
                    continue
                if readable(sock):
                    statuses[index] = read_status(sock, 5)
                    continue
                try:
                    sock.sendall(b"\xff")
                except OSError:
                    statuses[index] = read_status(sock, 1)
            if good.done() and len(statuses) == len(slow):
                break
            time.sleep(0.1)
        good_statuses = good.result(timeout=30)
    for index, sock in enumerate(slow):
        statuses.setdefault(index, read_status(sock, 1))
        sock.close()
    assert good_statuses == [200, 200, 200], "slow uploads took the queue from good requests"
    assert list(statuses.values()) == [408] * len(slow), statuses


def test_a_body_over_the_byte_budget_is_refused_before_it_is_read(
    live_server: Callable[..., Any], synthetic_jpeg: bytes
) -> None:
    # Budget: one batch request of 2 x 1 MiB (+256 KiB); a second body that would not fit is refused at once.
    server = live_server(max_image_bytes=1 << 20, max_batch_images=2, body_grace_s=30.0)
    holder = server.connect()
    holder.sendall(request_head("/v1/grade/batch", "multipart/form-data; boundary=x", 2 << 20) + b"--x\r\n")
    time.sleep(0.3)  # let the server start reading it
    latecomer = server.connect()
    latecomer.sendall(request_head("/v1/grade", "image/jpeg", 600_000))  # no body sent, none needed
    assert read_status(latecomer, 10) == 503
    latecomer.close()
    holder.close()  # its bytes are released when the server sees it leave
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(50):
            answer = client.post("/v1/grade", content=synthetic_jpeg, headers={"Content-Type": "image/jpeg"})
            if answer.status_code != 503:
                break
            time.sleep(0.1)
    assert answer.status_code == 200


def test_a_client_leaving_mid_body_is_499_not_500(
    live_server: Callable[..., Any], capfd: pytest.CaptureFixture[str]
) -> None:
    server = live_server(log_level="INFO")
    for path, content_type in (("/v1/grade", "image/jpeg"), ("/v1/grade/batch", "multipart/form-data; boundary=x")):
        sock = server.connect()
        part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        sock.sendall(request_head(path, content_type, 100_000) + part + b"\x00" * 1000)
        time.sleep(0.2)
        sock.close()
    for _ in range(100):
        counted = sum(
            request_count(server, route, status)
            for route in ("/v1/grade", "/v1/grade/batch")
            for status in ("499", "500")
        )
        if counted >= 2:
            break
        time.sleep(0.05)
    for route in ("/v1/grade", "/v1/grade/batch"):
        assert request_count(server, route, "500") == 0, route
        assert request_count(server, route, "499") == 1, route
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["level"] in ("ERROR", "CRITICAL")], lines
