"""Fixtures for the trainer's tests: a small corpus and a runner for the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.training.support import REPO, Run, parse_events, write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The environment of an in-process or child run: no SageMaker tree, no kiln variables."""
    for name in list(os.environ):
        if name.startswith(("SM_", "KILN_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_SAGEMAKER_ROOT", str(tmp_path / "no-sagemaker"))
    # Default outputs (runs/<job>) land in the test's directory, never in the repository.
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def run_trainer(clean_env: dict[str, str]) -> Callable[..., Run]:
    """Runs `python -m training.train ARGS` (or another launcher) as a child process."""

    def run(args: list[str], launcher: list[str] | None = None, timeout: float = 120) -> Run:
        cmd = (launcher or [sys.executable, "-m", "training.train"]) + args
        proc = subprocess.run(
            cmd, cwd=Path.cwd(), env=clean_env, capture_output=True, text=True, timeout=timeout
        )
        return Run(proc.returncode, parse_events(proc.stdout), proc.stderr)

    return run
