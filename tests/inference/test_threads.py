"""The CPU thread defaults: OpenMP's passive wait set before torch loads, and the thread count
from the CPUs this process may use (affinity, cgroup v2 or v1 quota)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from inference.threads import available_cpus, cgroup_cpu_limit, configure_openmp

REPO = Path(__file__).resolve().parents[2]


def test_passive_wait_is_a_default_not_an_override() -> None:
    env: dict[str, str] = {}
    configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_server_package_sets_it_before_torch_loads() -> None:
    code = "import os, inference.serve, sys; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "PASSIVE"


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(tmp_path: Path) -> None:
    mine = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == mine
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (mine + 4)} 100000\n")
    assert available_cpus(tmp_path) == mine
