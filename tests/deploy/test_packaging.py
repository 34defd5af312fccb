"""The package as a user installs it: licence metadata, dependency ranges and their pins, the shipped model
inside the wheel, ``--version`` and the library's entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = REPO / "constraints.txt"
MODEL_FILES = ("retinagrade-dr.onnx", "retinagrade-dr.json", "gate.json", "fundus-detector.onnx", "README.md")


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return found


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = pinned
    return pins


def test_licence_is_an_spdx_expression_with_its_file_and_setuptools_is_bounded() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    # The SPDX string and license-files need setuptools 77; an upper bound keeps the next major out.
    assert not setuptools.specifier.contains("76.1.0") and setuptools.specifier.contains("77.0.3")
    assert any(spec.operator == "<" for spec in setuptools.specifier), setuptools


def test_dependencies_are_compatible_ranges_and_constraints_pin_each_inside_its_range() -> None:
    pins = _pins(CONSTRAINTS)
    for requirement in _requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{requirement}: want a range >=x.y,<x+1, not {operators}"
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} has no exact pin in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}: {requirement}"
    # Another torch is a CUDA download of several GB: the pins keep the releases on the machines' disk.
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "retinagrade" not in pins


def test_constraints_pin_what_the_extras_pull_in_as_installed_here() -> None:
    # Every pinned package that is installed in this environment is installed at its pin (a drifted venv
    # or a stale constraints file fails here), and moto's server extra is pinned too.
    pins = _pins(CONSTRAINTS)
    assert {"flask", "flask-cors", "onnxruntime", "starlette", "numpy"} <= set(pins)
    drifted = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except Exception:  # not installed here (another platform's wheel, a skipped extra)
            continue
        if installed != pinned:
            drifted[name] = (pinned, installed)
    assert not drifted, f"constraints.txt vs installed: {drifted}"


def test_makefile_and_image_install_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    assert makefile.count("-c $(CONSTRAINTS) -e") == 2
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md LICENSE constraints.txt ./" in dockerfile
    assert re.search(r"pip install [^\n]*-r requirements\.txt[^\n]*-c constraints\.txt|-c constraints\.txt", dockerfile)
    assert "--no-deps ." in dockerfile
    assert "serving-requirements" not in dockerfile and "TRAINING_ONLY" not in dockerfile
    assert not (REPO / "deploy" / "container" / "serving-requirements.py").exists()


def test_every_package_under_src_is_listed_for_the_wheel() -> None:
    # pyproject lists its packages (to map retinagrade.models onto models/): a new subpackage must be added.
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO / "src").parts)
        for path in (REPO / "src").rglob("__init__.py")
        if "__pycache__" not in path.parts
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"retinagrade.models"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["retinagrade.models"] == "models"
    for name in MODEL_FILES:
        assert (REPO / "models" / name).is_file(), name


def test_version_flag_prints_the_installed_version() -> None:
    from typer.testing import CliRunner

    from retinagrade.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"retinagrade {version('retinagrade')}"


def test_grading_pipeline_is_importable_from_the_package_and_loaded_lazily() -> None:
    code = (
        "import sys, retinagrade\n"
        "assert 'retinagrade.pipeline' not in sys.modules and 'onnxruntime' not in sys.modules\n"
        "from retinagrade import GradingPipeline, GradeResult\n"
        "import retinagrade.pipeline as p\n"
        "assert GradingPipeline is p.GradingPipeline and GradeResult is p.GradeResult\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import retinagrade

    with pytest.raises(AttributeError):
        _ = retinagrade.NoSuchThing  # type: ignore[attr-defined]


def test_shipped_model_resolves_to_package_data_when_installed(tmp_path: Path, monkeypatch) -> None:
    from importlib import resources

    from retinagrade import pipeline

    package = tmp_path / "site-packages" / "retinagrade"
    (package / "models").mkdir(parents=True)
    (package / "models" / pipeline.DEFAULT_MODEL_FILE).write_text("{}")
    monkeypatch.setattr(resources, "files", lambda name: package if name == "retinagrade" else None)
    assert pipeline.shipped_model_dir() == package / "models"
    monkeypatch.undo()
    # ...and a source checkout reads the repository's models/.
    assert pipeline.shipped_model_dir().resolve() == (Path(pipeline.__file__).parents[2] / "models").resolve()


@pytest.mark.slow
def test_built_wheel_carries_the_model_and_grades_outside_the_checkout(tmp_path: Path, synthetic_fundus) -> None:
    """Build the wheel, install it (no dependencies: they come from this environment) into a new venv, and
    grade a photo from a folder with no checkout in sight: the default model must come from the wheel."""
    setuptools = pytest.importorskip("setuptools", reason="setuptools not installed (pip install setuptools)")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools>=77 (SPDX licence), this environment has {setuptools.__version__}")
    # Build from a copy of what the wheel is made of: setuptools writes build/ and *.egg-info where it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("retinagrade-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for name in MODEL_FILES:
        assert f"retinagrade/models/{name}" in names, name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert not any(n.startswith(("models/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # This environment's dependencies, behind the new venv's own site-packages (a .pth path line; the
    # editable install's own .pth there is not processed, so the checkout stays out of sys.path).
    import sysconfig

    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), cv2.cvtColor(synthetic_fundus(800, 800, 400, 400, 380), cv2.COLOR_RGB2BGR))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "RETINAGRADE_MODEL"}}
    check = (
        "import json, retinagrade, retinagrade.pipeline as p\n"
        "print(json.dumps([retinagrade.__file__, str(p.DEFAULT_MODEL), retinagrade.__version__]))\n"
    )
    where = subprocess.run(
        [str(python), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=True
    )
    module, model, installed_version = json.loads(where.stdout)
    assert Path(module).is_relative_to(site) and Path(model).is_relative_to(site / "retinagrade" / "models"), where
    assert installed_version == PYPROJECT["project"]["version"]
    out = tmp_path / "results.json"
    graded = subprocess.run(
        [str(venv / "bin" / "retinagrade"), "grade", str(photo), "-q", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert graded.returncode == 0, graded.stdout + graded.stderr
    (row,) = json.loads(out.read_text())
    assert row["image"].endswith("photo.png") and row["status"] != "error", row
