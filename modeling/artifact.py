"""The trained model on disk: safetensors weights, config and tokenizer in a directory or tarball.

The directory (what SageMaker unpacks into /opt/ml/model for the inference container):

- `config.json`: `{"format": "kiln-llama", "format_version": 1, "model": {ModelConfig fields},
  "dtype": "float32", "weights": "model.safetensors", "tokenizer": "tokenizer.json",
  "training": {...}}`
- `model.safetensors`: the `LlamaModel` state dict (no `lm_head.weight` when tied)
- `tokenizer.json`: the `ByteTokenizer` (type `kiln-byte-level`)

`model.tar.gz` holds those three files at its root, as SageMaker's model layout has it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modeling.config import ModelConfig
from modeling.model import LlamaModel, OpsName
from modeling.tokenizer import TOKENIZER_FILE, ByteTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TARBALL = "model.tar.gz"
FORMAT = "kiln-llama"
FORMAT_VERSION = 1
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ArtifactError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


def save_model_dir(
    model: LlamaModel,
    tokenizer: ByteTokenizer,
    directory: str | Path,
    *,
    dtype: str = "float32",
    training: dict[str, Any] | None = None,
) -> Path:
    """Writes config.json, model.safetensors and tokenizer.json into `directory`."""
    if dtype not in DTYPES:
        raise ArtifactError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to("cpu", DTYPES[dtype]).contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(out)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "dtype": dtype,
        "weights": WEIGHTS_FILE,
        "tokenizer": TOKENIZER_FILE,
        "special_tokens": tokenizer.special_tokens,
        "training": training or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for name in MODEL_FILES:
        # safetensors writes 0600; the inference container may run as another user.
        (out / name).chmod(0o644)
    return out


def read_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a kiln model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {raw.get('format_version')!r} is not 1")
    return ModelConfig.from_dict(raw["model"]), raw


def load_model_dir(
    directory: str | Path, *, ops: OpsName = "kiln", dtype: torch.dtype | None = None
) -> tuple[LlamaModel, ByteTokenizer]:
    """The model (in eval mode, float32 unless `dtype`) and tokenizer saved in `directory`."""
    cfg, raw = read_config(directory)
    weights = Path(directory) / raw.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    model = LlamaModel(cfg, ops=ops)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=False
    )
    if missing or unexpected:
        raise ArtifactError(f"{weights}: missing tensors {missing}, unexpected {unexpected}")
    if dtype is not None:
        model.to(dtype)
    tokenizer = ByteTokenizer.load(directory)
    return model.eval(), tokenizer


def _portable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Readable by any user and owned by no particular one: SageMaker unpacks it as root for a
    # container whose user is not the trainer's.
    info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
    return info


def write_tarball(directory: str | Path, tarball: str | Path) -> Path:
    """model.tar.gz with the model files at its root (SageMaker's model layout)."""
    src, dst = Path(directory), Path(tarball)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dst, "w:gz") as tar:
        for name in MODEL_FILES:
            tar.add(src / name, arcname=name, filter=_portable)
    return dst
