"""The model on disk: a Hugging Face model directory (or a model.tar.gz of one), written and read.

A kiln model directory is a Hugging Face one: `transformers` (`AutoModelForCausalLM`,
`AutoTokenizer`, `pipeline`), vLLM and SageMaker LMI load what kiln trains as it is, and kiln
loads what they load, for the families in `modeling.hf` (Llama 2/3/3.x, Mistral, Qwen2/2.5).
What `save_model_dir` writes (and SageMaker unpacks into /opt/ml/model):

- `config.json`: the architecture as `transformers` reads it (`model_type` `llama`, or `qwen2`
  for a model with q/k/v biases alone; `architectures`, sizes, `rope_theta`/`rope_scaling`,
  `tie_word_embeddings`, `torch_dtype`, `bos_token_id`, `eos_token_id`)
- `model.safetensors`: the weights under Hugging Face's names (`model.layers.N.self_attn.q_proj
  .weight`, ...; q/k/v and gate/up unfused, kiln fuses them at load), in `torch_dtype`; above
  `max_shard_bytes` instead `model-0000N-of-0000M.safetensors` and
  `model.safetensors.index.json` (`weight_map`: tensor name -> file)
- `generation_config.json`: `bos_token_id`, `eos_token_id` (a list where a model ends on several),
  `pad_token_id`
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer in the `tokenizers` library's format
  (kiln's byte-level one as a BPE over the 256 bytes, see `ByteTokenizer.to_hf_json`)
- `kiln.json`: kiln's own metadata, `{"format": "kiln", "format_version": 2, "dtype": ...,
  "training": {job_name, step, tokens, seed}}`; Hugging Face tooling ignores it

`load_model_dir` reads that, a directory that `transformers`' `save_pretrained` wrote, a released
checkpoint's (sharded, bfloat16, `rope_scaling`, a chat template in tokenizer_config.json), and
kiln's first format (`config.json` with `"format": "kiln-llama"`, kiln's fused tensor names, a
`tokenizer.json` of type `kiln-byte-level`). A model outside the families is refused in one
line naming `config.json` and the field.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling import hf
from modeling.config import ConfigError, ModelConfig
from modeling.model import LlamaModel, OpsName, load_ops
from modeling.rope import rope_table
from modeling.tokenizer import (
    HF_GENERATION_CONFIG,
    HF_TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = HF_GENERATION_CONFIG
TOKENIZER_CONFIG_FILE = HF_TOKENIZER_CONFIG
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
KILN_FILE = "kiln.json"
TARBALL = "model.tar.gz"
LEGACY_FORMAT = "kiln-llama"
FORMAT = "kiln"
FORMAT_VERSION = 2
# An unsharded directory as save_model_dir writes it.
MODEL_FILES = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    KILN_FILE,
)
# transformers' default largest shard.
MAX_SHARD_BYTES = 5_000_000_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class ArtifactError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# writing


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, packed into files of at most max_bytes (one larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_model_dir(
    model: LlamaModel,
    tokenizer: ByteTokenizer | HFTokenizer,
    directory: str | Path,
    *,
    dtype: str = "float32",
    training: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes the Hugging Face model directory of `model` and `tokenizer` into `directory`."""
    if dtype not in DTYPES:
        raise ArtifactError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a previous save's weights, perhaps sharded differently
        if stale.name in (WEIGHTS_FILE, WEIGHTS_INDEX) or _SHARD.fullmatch(stale.name):
            stale.unlink()
    cfg = model.config
    state = {name: t.detach().to("cpu", DTYPES[dtype]) for name, t in model.state_dict().items()}
    tensors = {k: v.contiguous() for k, v in hf.to_hf_tensors(state, cfg).items()}
    shards = _shards(tensors, max_shard_bytes)
    written = [
        CONFIG_FILE,
        GENERATION_CONFIG_FILE,
        TOKENIZER_FILE,
        TOKENIZER_CONFIG_FILE,
        KILN_FILE,
    ]
    if len(shards) == 1:
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        written.append(WEIGHTS_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, name)
            written.append(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(WEIGHTS_INDEX)

    tokenizer.save(out)
    bos = tokenizer.bos_id
    eos = sorted(tokenizer.eos_ids)
    eos_id: int | list[int] | None = eos[0] if len(eos) == 1 else (eos or None)
    pad = getattr(tokenizer, "pad_id", None)
    config = hf.config_to_hf(
        cfg, dtype=dtype, bos_token_id=bos, eos_token_id=eos_id, pad_token_id=pad
    )
    _write_json(out / CONFIG_FILE, config)
    _write_json(
        out / GENERATION_CONFIG_FILE,
        {"bos_token_id": bos, "eos_token_id": eos_id, "pad_token_id": pad},
    )
    kiln = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "training": training or {},
    }
    _write_json(out / KILN_FILE, kiln)
    for name in written:
        # safetensors writes 0600; the inference container may run as another user.
        (out / name).chmod(0o644)
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object")
    return data


def read_config(
    directory: str | Path, *, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """The model's config and what else the directory says of it: `format` ("hf" or the legacy
    "kiln-llama"), `model_type`, `dtype` (as stored), `training` (kiln.json's), `weights` (the
    weight files). `max_seq_len` caps a Hugging Face model's context (the default is its
    `max_position_embeddings`). ArtifactError names config.json and what is wrong, in one line."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a model directory")
    raw = _read_json(path)
    if raw.get("format") == LEGACY_FORMAT:
        if raw.get("format_version") != 1:
            raise ArtifactError(f"{path}: format_version {raw.get('format_version')!r} is not 1")
        try:
            cfg = ModelConfig.from_dict(raw["model"])
        except (ConfigError, KeyError, TypeError) as err:
            raise ArtifactError(f"{path}: {err}") from err
        info = {
            "format": LEGACY_FORMAT,
            "model_type": "llama",
            "dtype": raw.get("dtype", "float32"),
            "training": raw.get("training", {}),
            "weights": [raw.get("weights", WEIGHTS_FILE)],
        }
        return cfg, info
    if "model_type" not in raw:
        raise ArtifactError(
            f"{path}: no model_type: neither a Hugging Face model's config nor a kiln one"
        )
    try:
        cfg = hf.config_from_hf(raw, max_seq_len=max_seq_len)
    except (ConfigError, ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: {err}") from err
    kiln = _read_json(directory / KILN_FILE) if (directory / KILN_FILE).is_file() else {}
    info = {
        "format": "hf",
        "model_type": raw["model_type"],
        "dtype": raw.get("torch_dtype") or raw.get("dtype") or kiln.get("dtype"),
        "training": kiln.get("training", {}),
        "weights": weight_files(directory),
    }
    return cfg, info


def weight_files(directory: str | Path) -> list[str]:
    """The safetensors files of a Hugging Face directory: the index's, or model.safetensors."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ArtifactError(f"{index} has no weight_map")
        return sorted(set(weight_map.values()))
    if (directory / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if any(directory.glob("*.bin")):
        raise ArtifactError(
            f"{directory} holds PyTorch .bin weights: kiln reads safetensors only (transformers' "
            "save_pretrained writes them by default)"
        )
    raise ArtifactError(f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}")


def load_model_dir(
    directory: str | Path,
    *,
    ops: OpsName = "kiln",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> tuple[LlamaModel, Tokenizer]:
    """The model (in eval mode) and tokenizer saved in `directory`.

    The weights keep the dtype they are stored in unless `dtype` is given, and are read one
    tensor at a time into the model's parameters (the model is built on the meta device, so
    nothing is initialized and then overwritten): memory holds the model once, plus one tensor
    (a fused q/k/v or gate/up is filled from its parts in place).
    """
    directory = Path(directory)
    cfg, info = read_config(directory, max_seq_len=max_seq_len)
    load_ops(ops)  # a first import of the kernels happens outside the meta-device context
    with torch.device("meta"):
        model = LlamaModel(cfg, ops=ops)
    state = _read_weights(directory, cfg, info, model, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.rope = rope_table(cfg)
    try:
        tokenizer = load_tokenizer(directory)
    except FileNotFoundError as err:
        raise ArtifactError(f"{directory / TOKENIZER_FILE} is missing") from err
    return model.eval(), tokenizer


def _read_weights(
    directory: Path,
    cfg: ModelConfig,
    info: dict[str, Any],
    model: LlamaModel,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if info["format"] == LEGACY_FORMAT:
        sources = {name: [name] for name in expected}
    else:
        sources = hf.tensor_sources(cfg)
    files = [directory / name for name in info["weights"]]
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        for file in files:
            if not file.is_file():
                raise ArtifactError(f"{file} is missing")
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as err:
                raise ArtifactError(f"{file}: {type(err).__name__}: {err}") from err
            where |= dict.fromkeys(handle.keys(), (file, handle))
        needed = {n for parts in sources.values() for n in parts}
        missing = sorted(needed - set(where))
        ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
        unexpected = sorted(
            n for n in set(where) - needed - ignored if not n.endswith(hf.IGNORED_SUFFIXES)
        )
        if missing or unexpected:
            shown = ", ".join(f.name for f in files)
            raise ArtifactError(
                f"{shown}: the tensors do not match {directory / CONFIG_FILE}: missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        if dtype is None:  # as stored: the embedding's dtype for every tensor
            _, handle = where[sources["embed_tokens.weight"][0]]
            dtype = handle.get_slice(sources["embed_tokens.weight"][0]).get_dtype()
            dtype = _SAFETENSORS_DTYPES.get(str(dtype), torch.float32)
        state = {}
        for name, parts in sources.items():
            tensors = []
            for part in parts:
                file, handle = where[part]
                tensors.append((file, part, handle.get_tensor(part)))
            if len(tensors) == 1:
                tensor = tensors[0][2].to(dtype)
            else:
                rows = sum(t.shape[0] for _, _, t in tensors)
                tensor = torch.empty((rows, *tensors[0][2].shape[1:]), dtype=dtype)
                start = 0
                for _, _, t in tensors:
                    tensor[start : start + t.shape[0]].copy_(t)
                    start += t.shape[0]
            if tensor.shape != expected[name]:
                file = tensors[0][0]
                names = ", ".join(part for _, part, _ in tensors)
                shapes = ", ".join(str(tuple(t.shape)) for _, _, t in tensors)
                verb, together = ("is", "") if len(tensors) == 1 else ("are", " together")
                raise ArtifactError(
                    f"{file}: {names} {verb} {shapes} where {directory / CONFIG_FILE} needs "
                    f"{tuple(expected[name])}{together}"
                )
            del tensors
            state[name] = tensor
    return state


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ------------------------------------------------------------------------------------------------
# the tarball


def model_files(directory: str | Path) -> list[str]:
    """The files a model directory is made of: every regular file at its top (config, weights or
    their shards and index, tokenizer files, a chat template, kiln.json) but a tarball, sorted."""
    return sorted(
        p.name for p in Path(directory).iterdir() if p.is_file() and not p.name.endswith(".tar.gz")
    )


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
        for name in model_files(src):
            tar.add(src / name, arcname=name, filter=_portable)
    return dst
