"""`make system-packages` on a fresh machine, with apt-get, dpkg-query and id replaced by recorders."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, find_tool

#: Debian packages whose tools the suite uses: Chromium (browser tests), promtool (prometheus), podman
#: (podman-compose renders the Compose file through it) and shellcheck (actionlint's shell checks).
NEEDED = {"chromium", "prometheus", "podman", "shellcheck", "orthanc", "orthanc-dicomweb", "dcmtk"}


def _system_packages() -> list[str]:
    match = re.search(r"^SYSTEM_PACKAGES \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile declares no SYSTEM_PACKAGES"
    return match.group(1).split()


def _fake_machine(tmp_path: Path, installed: set[str], *, install_fails: set[str] = frozenset()) -> dict[str, str]:
    """A bin folder whose apt-get/dpkg-query/id record their calls; returns the environment for make."""
    if shutil.which("make") is None:
        pytest.skip("make not installed (apt-get install make)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    have, broken = " ".join(sorted(installed)), " ".join(sorted(install_fails))
    scripts = {
        "dpkg-query": f"""for p in "$@"; do :; done
case " {have} " in *" $p "*) printf 'install ok installed';; *) exit 1;; esac""",
        "apt-get": f"""echo "$*" >> {log}
if [ "$1" = install ]; then for p in "$@"; do case " {broken} " in *" $p "*) exit 100;; esac; done; fi
exit 0""",
        "id": "echo 0",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "MAKEFLAGS": ""}


def _make_system_packages(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "system-packages"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_system_packages_list_every_tool_the_tests_use() -> None:
    assert set(_system_packages()) >= NEEDED


def test_system_packages_installs_only_what_is_missing_after_one_update(tmp_path: Path) -> None:
    env = _fake_machine(tmp_path, installed={"chromium", "prometheus"})
    result = _make_system_packages(env)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    updates = [call for call in calls if call.split()[0] == "update"]
    installs = [call.split() for call in calls if call.split()[0] == "install"]
    assert len(updates) == 1, calls
    assert len(installs) == 1 and {"podman", "shellcheck"} <= set(installs[0]), calls
    assert not {"chromium", "prometheus"} & set(installs[0]), "reinstalls what dpkg lists"


def test_system_packages_with_nothing_missing_touches_nothing(tmp_path: Path) -> None:
    env = _fake_machine(tmp_path, installed=set(_system_packages()))
    result = _make_system_packages(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "apt.log").exists(), "apt-get ran although everything is installed"


def test_a_package_that_cannot_be_installed_never_fails_the_build(tmp_path: Path) -> None:
    env = _fake_machine(tmp_path, installed=set(), install_fails={"podman"})
    result = _make_system_packages(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not install podman: the tests that need it will skip" in result.stdout
    # ...and the others are still installed, one by one.
    installs = [call.split() for call in (tmp_path / "apt.log").read_text().splitlines() if call.startswith("install")]
    assert any(call[-1] == "shellcheck" for call in installs), installs


def test_podman_compose_check_skips_with_its_reason_when_podman_is_absent(tmp_path: Path) -> None:
    # The machine of issue 8 had podman-compose (pip) but no podman binary: the check must skip, saying so.
    if find_tool("podman-compose") is None:
        pytest.skip("podman-compose not installed (pip install -e '.[deploy]')")
    empty = tmp_path / "no-tools"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/deploy/test_compose_monitoring.py::test_podman_compose_renders_the_file",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 skipped" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "podman not installed (make system-packages" in result.stdout, result.stdout[-2000:]
