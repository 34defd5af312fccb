"""Fixtures for the service tests: settings for a real model, one shared running app, test images.

The model is the one named by ``$RETINAGRADE_MODEL``, else the shipped ``models/retinagrade-dr.json``; the
tests skip with that reason when neither exists. They assert behaviour any trained model must have (real
fundus photographs are graded, probabilities sum to one) and never a particular grade.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

MODEL_REASON = "needs a model: set RETINAGRADE_MODEL or install models/retinagrade-dr.json"


@pytest.fixture(scope="session")
def model_spec_path(model_path: Path) -> Path:
    """The model under test (``tests/conftest.py``: ``$RETINAGRADE_MODEL`` or the shipped model)."""
    path = model_path
    if not path.is_file():
        pytest.skip(MODEL_REASON)
    return path


@pytest.fixture(scope="session")
def gate_is_placeholder(model_spec_path: Path) -> bool:
    """The development model ships a placeholder quality gate that cannot tell a cat from a fundus."""
    spec = json.loads(model_spec_path.read_text())
    gate = model_spec_path.parent / spec.get("gate_file", "gate.json")
    return bool(json.loads(gate.read_text()).get("meta", {}).get("dev"))


@pytest.fixture
def make_settings(model_spec_path: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test app: the test model, a private audit store, small limits unless overridden."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": model_spec_path,
            "audit_path": tmp_path / "audit.sqlite3",
            "threads": 2,
            "prepare_workers": 2,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture(scope="session")
def client(model_spec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One started app shared by the tests that need no special settings (start-up costs a second)."""
    settings = Settings(
        model=model_spec_path,
        audit_path=tmp_path_factory.mktemp("audit") / "audit.sqlite3",
        threads=2,
        prepare_workers=2,
        log_level="WARNING",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def fundus_jpeg(right_eye_photo: Path) -> bytes:
    """A JPEG of a real fundus that the gate grades (a raw camera JPEG where ``../shared/data`` is present)."""
    return right_eye_photo.read_bytes()


def encode(rgb: np.ndarray, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def synthetic_jpeg(synthetic_fundus: Callable[..., np.ndarray]) -> bytes:
    """A small fundus-like JPEG for tests that need a decodable image but not a real photograph."""
    return encode(synthetic_fundus(800, 600, 400, 300, 280), quality=90)


@pytest.fixture(scope="session")
def black_png() -> bytes:
    """A black frame: no field of view, so never a fundus."""
    return encode(np.zeros((480, 640, 3), np.uint8), "PNG")


@pytest.fixture(scope="session")
def metrics_text() -> Callable[[TestClient], str]:
    """What an app's separate /metrics listener answers (it is not on the API port)."""

    from retinagrade.api.routes.metrics import create_metrics_app

    def read(client: TestClient) -> str:
        response = TestClient(create_metrics_app(client.app.state.metrics)).get("/metrics")  # type: ignore[attr-defined]
        assert response.status_code == 200
        return response.text

    return read


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A real uvicorn server on loopback, in a thread of this process (so tests can read its app's state)."""

    app: FastAPI
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        """A raw TCP connection, for clients that misbehave below the level of an HTTP library."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@pytest.fixture
def live_server(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start the app with these settings under uvicorn on 127.0.0.1; stopped after the test."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> LiveServer:
        app = create_app(make_settings(**overrides))
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        thread = threading.Thread(target=server.run, name="live-server", daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return LiveServer(app, port)

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=30)
