"""How many CPUs this process may really use: its affinity mask and its cgroup's CPU quota, not the host's count.

A container limited to 2 CPUs on a 64-core host sees ``os.cpu_count() == 64``; pools sized from that
oversubscribe the quota and every request waits on the CFS throttle. Thread pools are sized from
:func:`available_cpus` instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2 (``quota period`` or ``max period``) and v1 (quota and period in two files) quota files.
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _cgroup_quota(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """CPUs the cgroup quota allows (fractional), or None when there is no quota or it cannot be read."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(p.read_text()) for p in v1)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> int:
    """CPUs this process may use: the smaller of its affinity mask and its cgroup quota (rounded up), >= 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = _cgroup_quota(v2, v1)
    if quota is not None:
        affinity = min(affinity, math.ceil(quota))
    return max(1, affinity)
