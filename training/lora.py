"""LoRA: low-rank adapters on the model's projections, the base weights frozen.

`--lora-targets` names projections as Hugging Face does (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`). kiln fuses q/k/v and gate/up into one matrix each, so an
adapter on `q_proj` adds `scale * B_q @ A_q` to the q rows of `qkv_proj` only. Adapters are
`Adapter` modules registered on the projection they adapt (`layers.N.attn.qkv_proj.adapter.A_q`),
so a sharded strategy shards them with their block, and the model's training pass adds their
output through `lora_linear`. At the end the adapters are merged into the weights (a plain model
directory) and also written alone in PEFT's layout (`adapter_model.safetensors`,
`adapter_config.json`), which PEFT and vLLM load onto the base model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from modeling.config import ModelConfig
from modeling.model import LlamaModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Hugging Face target -> (kiln module under a block, Hugging Face module path under a layer).
_MODULES = {
    "q_proj": ("attn.qkv_proj", "self_attn.q_proj"),
    "k_proj": ("attn.qkv_proj", "self_attn.k_proj"),
    "v_proj": ("attn.qkv_proj", "self_attn.v_proj"),
    "o_proj": ("attn.o_proj", "self_attn.o_proj"),
    "gate_proj": ("mlp.gate_up_proj", "mlp.gate_proj"),
    "up_proj": ("mlp.gate_up_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj", "mlp.down_proj"),
}


class LoraError(ValueError):
    """Adapter settings that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def parse(cls, rank: int, alpha: float | None, targets: str) -> LoraSpec:
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if names == ["all-linear"]:
            names = list(TARGETS)
        unknown = [n for n in names if n not in TARGETS]
        if unknown or not names:
            raise LoraError(
                f"--lora-targets: {unknown or 'nothing'} not among {', '.join(TARGETS)} "
                "(or all-linear)"
            )
        return cls(rank, float(alpha if alpha is not None else 2 * rank), tuple(names))


def _row_parts(cfg: ModelConfig, module: str) -> list[tuple[str, int, int]]:
    """(target, first row, end row) of each part of a (fused) projection's output rows."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    i = cfg.intermediate_size
    if module == "attn.qkv_proj":
        return [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
    if module == "mlp.gate_up_proj":
        return [("gate_proj", 0, i), ("up_proj", i, 2 * i)]
    if module == "attn.o_proj":
        return [("o_proj", 0, cfg.hidden_size)]
    return [("down_proj", 0, cfg.hidden_size)]


class Adapter(nn.Module):
    """The adapters of one projection: for each adapted part of its rows, A [r, in] and
    B [rows, r]; its output is the projection's, plus `scale * x @ A.T @ B.T` on those rows."""

    def __init__(
        self, in_features: int, parts: list[tuple[str, int, int]], spec: LoraSpec, targets: set[str]
    ) -> None:
        super().__init__()
        self.parts, self.scale = parts, spec.scale
        self.adapted = [name for name, _, _ in parts if name in targets]
        for name, start, end in parts:
            if name in self.adapted:
                a = nn.Parameter(torch.empty(spec.rank, in_features))
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT; B = 0: no change at start
                self.register_parameter(f"A_{name}", a)
                self.register_parameter(
                    f"B_{name}", nn.Parameter(torch.zeros(end - start, spec.rank))
                )

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for name, start, end in self.parts:
            if name in self.adapted:
                a, b = getattr(self, f"A_{name}"), getattr(self, f"B_{name}")
                outs.append(F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale)
            else:
                outs.append(x.new_zeros(*x.shape[:-1], end - start))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def lora_linear(module: nn.Module, x: Tensor) -> Tensor:
    """The training pass's projection with adapters: the frozen weight's output plus theirs."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    out = F.linear(x, weight, getattr(module, "bias", None))
    adapter = module._modules.get("adapter")
    return out if adapter is None else out + adapter(x)


def attach(model: LlamaModel, spec: LoraSpec) -> None:
    """Freezes every weight and registers adapters on the targeted projections."""
    cfg = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {_MODULES[t][0] for t in spec.targets}
    for block in model.layers:
        for path in sorted(modules):
            linear = block.get_submodule(path)
            parts = _row_parts(cfg, path)
            adapter = Adapter(linear.in_features, parts, spec, set(spec.targets))
            linear.add_module("adapter", adapter.to(linear.weight.device))
    model.linear = lora_linear


def merge(
    state: dict[str, Tensor], cfg: ModelConfig, spec: LoraSpec
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A state dict with adapters -> (the plain model's, weights + scale * B @ A, in float32
    then the weight's dtype; the adapters alone under PEFT's names)."""
    plain = {k: v for k, v in state.items() if ".adapter." not in k}
    peft: dict[str, Tensor] = {}
    for i in range(cfg.num_layers):
        for path in sorted({_MODULES[t][0] for t in spec.targets}):
            key = f"layers.{i}.{path}.weight"
            weight = plain[key].float().clone()
            for name, start, end in _row_parts(cfg, path):
                if name not in spec.targets:
                    continue
                a = state[f"layers.{i}.{path}.adapter.A_{name}"].float()
                b = state[f"layers.{i}.{path}.adapter.B_{name}"].float()
                weight[start:end] += spec.scale * (b @ a)
                hf = f"base_model.model.model.layers.{i}.{_MODULES[name][1]}"
                peft[f"{hf}.lora_A.weight"] = a.contiguous()
                peft[f"{hf}.lora_B.weight"] = b.contiguous()
            # float32 even over a bfloat16 base: the adapters' small deltas would round away;
            # the export casts to --save-dtype.
            plain[key] = weight
    return plain, peft


def save_adapter(
    peft: dict[str, Tensor], spec: LoraSpec, directory: str | Path, *, base: str | None
) -> Path:
    """The adapters alone as PEFT writes them: adapter_model.safetensors, adapter_config.json."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (out / name).chmod(0o644)
    return out


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Stores the frozen (base) parameters in `dtype` (bfloat16 under bf16 autocast: the
    forward computes in it anyway), the trainable adapters staying float32. Returns the bytes
    saved. The projections compute through autocast, which casts per op, so the model's forward
    runs unchanged; the embedding's output is widened back to float32 there (`FunctionalOps`)."""
    saved = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved


def trainable(params: Sequence[nn.Parameter]) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    on = sum(p.numel() for p in params if p.requires_grad)
    return on, sum(p.numel() for p in params) - on
