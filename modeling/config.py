"""The model's shape as a dataclass, validated, with named presets and a JSON form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The RoPE variants of the Llama family (Hugging Face's `rope_scaling` / `rope_parameters` types).
ROPE_SCALINGS = ("linear", "dynamic", "llama3")


class ConfigError(ValueError):
    """A model configuration that cannot build a model; the message says what to change."""


@dataclass(frozen=True)
class RopeScaling:
    """A rotary-embedding frequency scaling, as Hugging Face's `rope_scaling` describes it.

    `linear` divides every frequency by `factor`; `llama3` divides the low frequencies by `factor`
    and blends the middle band (`low_freq_factor`, `high_freq_factor`, relative to
    `original_max_position_embeddings`); `dynamic` (NTK) changes nothing within
    `max_position_embeddings`, the most kiln serves (see `modeling.rope`).
    """

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(
                f"rope scaling type must be one of {ROPE_SCALINGS}, got {self.type!r}"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor!r}")
        if self.type == "llama3" and (
            self.original_max_position_embeddings < 1
            or self.high_freq_factor <= self.low_freq_factor
        ):
            raise ConfigError(
                "llama3 rope scaling needs original_max_position_embeddings >= 1 and "
                "high_freq_factor > low_freq_factor"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder; field meanings follow Hugging Face's `LlamaConfig`."""

    vocab_size: int = 320
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    # Biases on the q, k, v projections (Qwen2; Llama's `attention_bias`) and on the output one
    # (Llama's `attention_bias` only).
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.num_heads % self.num_kv_heads:
                problems.append(
                    f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                    f"({self.num_kv_heads}) for grouped-query attention"
                )
            if self.head_dim % 2:
                problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.o_bias and not self.qkv_bias:
            problems.append(
                "o_bias needs qkv_bias (no Llama-family model has one without the other)"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            try:
                data = {**data, "rope_scaling": RopeScaling(**scaling)}
            except TypeError as err:
                raise ConfigError(f"rope_scaling {scaling!r}: {err}") from err
        return cls(**data)

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv = d * (self.num_heads + 2 * self.num_kv_heads)
        attn = h * qkv + self.num_heads * d * h
        attn += qkv * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + h


# Named sizes for `--model`; "tiny" keeps CPU tests fast, "small" is the default local run.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_seq_len=256,
    ),
    "small": ModelConfig(),
    "base": ModelConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
    "1b": ModelConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
}
