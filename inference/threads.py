"""CPU thread defaults that hold up when other processes share the cores: OpenMP's idle threads
sleep rather than spin, and the default thread count is the CPUs this process may actually use.

No torch here: `configure_openmp` must run before torch loads libgomp, which reads its settings
once, at load (`inference/__init__.py` calls it).
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def configure_openmp(env: MutableMapping[str, str] = os.environ) -> None:
    """Idle OpenMP threads wait passively, unless the environment says otherwise.

    libgomp's default spins up to 300,000 iterations after each parallel region: on a shared
    machine those spins take the core from the process that holds it, and CFS later charges them
    to this one, so its threads are descheduled mid-op. kiln's own ops run on kiln's pool
    (kernels/csrc/cpu/parallel.h); this covers torch's (prefill attention, the MKL GEMMs).
    """
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 cpu.max, else v1 cfs quota/period); None: no
    quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (its affinity mask), at most its cgroup's quota rounded
    up; at least 1. torch's own default counts the machine's cores, whatever the container
    allows, and a thread more than the CPUs granted waits on the others every op."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
