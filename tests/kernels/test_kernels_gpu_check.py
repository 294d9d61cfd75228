"""`make gpu-check` on a machine without a GPU: it does what it can, then says why it stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_without_a_gpu_stops_with_one_line_reason(tmp_path: Path) -> None:
    log = tmp_path / "gpu-check.log"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.gpu_check",
            "--assume-no-gpu",
            "--skip-compile",  # the nvcc compile check is test_kernels_build.py's
            "--log",
            str(log),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu-check: stopped: no NVIDIA GPU on this machine;"), lines[-1]
    assert "kernels/README.md" in lines[-1]
    # the device report came first (nvidia-smi's, or that it is absent; torch's view), then the
    # summary of the steps it could do
    out = done.stdout
    assert "===== device =====" in out and "===== summary =====" in out
    assert "nvidia-smi" in out and '"torch": ' in out
    assert out.index("===== device =====") < out.index("===== summary =====")
    summary = out[out.index("===== summary =====") :]
    assert "device     no GPU" in summary and "compile    skipped" in summary
    for later in ("build", "tests", "sanitizer", "bench"):
        assert f"===== {later} =====" not in out
    # one log with the same lines
    assert log.read_text().strip().splitlines()[-1] == lines[-1]


def test_make_target_runs_the_script() -> None:
    done = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "-m kernels.gpu_check" in done.stdout
