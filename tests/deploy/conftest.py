"""Helpers for the deployment tests: find each tool, or skip with the reason and the install command."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
PROMETHEUS_DIR = COMPOSE_DIR / "prometheus"
TERRAFORM_DIR = DEPLOY / "terraform"
WORKFLOWS = REPO / ".github" / "workflows"


def find_tool(name: str) -> str | None:
    """``name`` beside this interpreter (the venv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str, install: str) -> str:
    """The tool's path, or skip the test saying how to install it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed ({install})")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "apt-get install prometheus")


@pytest.fixture(scope="session")
def service_metric_samples() -> set[str]:
    """Every sample name the service can expose on /metrics, from its own metrics module."""
    from prometheus_client.metrics_core import Metric

    from retinagrade.api.telemetry import ServiceMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    family: Metric
    for family in ServiceMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names
