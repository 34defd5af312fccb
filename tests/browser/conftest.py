"""Fixtures for the browser tests: the real service on a free 127.0.0.1 port, and Debian's Chromium.

Chromium is driven by the ``playwright`` package (its driver is bundled) with ``executable_path`` pointing at
the system browser; nothing is downloaded. The tests skip, saying why, where the browser, the package or a
model is missing. Install the browser with ``apt-get install -y chromium``.

The model is ``$RETINAGRADE_MODEL``, else the shipped ``models/retinagrade-dr.json``. The development model
ships a placeholder quality gate that cannot tell a cat from a fundus; when the repository's fitted gate
(``models/gate.json``, the one the shipped model uses) is present, the development network is served with that
gate instead, so the page's refusal of a non-fundus photo can be seen before the shipped model lands.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

CHROMIUM = Path(os.environ.get("RETINAGRADE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL_REASON = "needs a model: set RETINAGRADE_MODEL or install models/retinagrade-dr.json"
REPO = Path(__file__).resolve().parents[2]
FITTED_GATE = REPO / "models" / "gate.json"
#: Screenshots land here (git-ignored); the good ones are copied to docs/screenshots/ by hand.
OUTPUT = REPO / "test-output" / "screenshots"


def _is_placeholder_gate(path: Path) -> bool:
    return bool(json.loads(path.read_text()).get("meta", {}).get("dev"))


@dataclass(frozen=True)
class ServedModel:
    spec: Path
    #: Whether its quality gate can refuse a non-fundus photo (False for the development placeholder).
    real_gate: bool


@pytest.fixture(scope="session")
def served_model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    spec_path = model_path
    if not spec_path.is_file():
        pytest.skip(MODEL_REASON)
    spec = json.loads(spec_path.read_text())
    gate = spec_path.parent / spec.get("gate_file", "gate.json")
    if not _is_placeholder_gate(gate):
        return ServedModel(spec_path, real_gate=True)
    if not FITTED_GATE.is_file() or _is_placeholder_gate(FITTED_GATE):
        return ServedModel(spec_path, real_gate=False)
    folder = tmp_path_factory.mktemp("model-with-fitted-gate")
    (folder / spec_path.name).write_text(json.dumps(spec))
    (folder / spec["model_file"]).symlink_to(spec_path.parent / spec["model_file"])
    shutil.copyfile(FITTED_GATE, folder / spec.get("gate_file", "gate.json"))
    detector = json.loads(FITTED_GATE.read_text()).get("detector")
    if detector:  # the gate's own ONNX detector lies beside it
        (folder / detector["file"]).symlink_to(FITTED_GATE.parent / detector["file"])
    spec.pop("gate_files", None)  # the copied gate is not the one the spec's checksums name
    (folder / spec_path.name).write_text(json.dumps(spec))
    return ServedModel(folder / spec_path.name, real_gate=True)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """Run the service (lifespan and all) with uvicorn in a background thread; yields its base URL."""
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the service did not start (see the log above)")
        time.sleep(0.05)
    host, port = sock.getsockname()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def make_settings(served_model: ServedModel, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": served_model.spec,
            "audit_path": tmp_path_factory.mktemp("audit") / "audit.sqlite3",
            "threads": 1,
            "prepare_workers": 1,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture(scope="session")
def start_service() -> Callable[[Settings], AbstractContextManager[str]]:
    """:func:`serve`, for tests that need a service with settings of their own."""
    return serve


@pytest.fixture(scope="session")
def base_url(make_settings: Callable[..., Settings]) -> Iterator[str]:
    """The service with default settings (no API keys)."""
    with serve(make_settings()) as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs the playwright package (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any, base_url: str) -> Iterator[Callable[..., Any]]:
    """Opens the screening page in a fresh context; any request off 127.0.0.1 fails the test."""
    contexts: list[Any] = []
    off_machine: list[str] = []

    def block_others(route: Any) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1:", "blob:", "data:")):
            route.continue_()
        else:
            off_machine.append(url)
            route.abort()

    def open_(width: int = 1280, height: int = 900, url: str = base_url) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, locale="en-GB")
        context.route("**/*", block_others)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(url + "/")
        page.wait_for_selector("#model-line:has-text('Model:'), #api-key-form:not([hidden])")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not off_machine, f"the page tried to reach other machines: {off_machine}"


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT
