"""Pool sizes follow the CPUs the process may use (affinity, cgroup quota), not the host's count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retinagrade.cpus import available_cpus


@pytest.fixture
def affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def _v2(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


NO_V1 = (Path("/nonexistent/quota"), Path("/nonexistent/period"))


@pytest.mark.usefixtures("affinity")
@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("200000 100000\n", 2), ("150000 100000\n", 2), ("max 100000\n", 64)]
)
def test_a_cgroup_v2_quota_bounds_the_count(tmp_path: Path, cpu_max: str, expected: int) -> None:
    assert available_cpus(_v2(tmp_path, cpu_max), NO_V1) == expected


@pytest.mark.usefixtures("affinity")
def test_a_cgroup_v1_quota_bounds_the_count(tmp_path: Path) -> None:
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert available_cpus(tmp_path / "missing", (quota, period)) == 3
    quota.write_text("-1\n")  # no quota
    assert available_cpus(tmp_path / "missing", (quota, period)) == 64


def test_the_affinity_mask_bounds_the_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus(_v2(tmp_path, "max 100000"), NO_V1) == 1


def test_the_service_sizes_its_pool_from_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from retinagrade.api.settings import Settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("RETINAGRADE_PREPARE_WORKERS", raising=False)
    assert Settings().prepare_workers <= 2
