"""The Llama-architecture decoder, built on kiln's fused ops (or their pure-PyTorch references)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.config import ModelConfig

OpsName = Literal["kiln", "reference"]


def load_ops(name: OpsName) -> Any:
    """The op set a model calls: `kernels.ops` (compiled, reference fallback) or the references.

    "reference" exists for the benchmark and for exact comparisons; training uses "kiln".
    """
    if name == "kiln":
        from kernels import ops

        return ops
    if name == "reference":
        from kernels import reference

        return SimpleNamespace(
            rms_norm=reference.rms_norm,
            fused_add_rms_norm=reference.fused_add_rms_norm,
            silu_and_mul=reference.silu_and_mul,
            rotary_embedding=reference.rotary_embedding,
            rope_cache=reference.rope_cache,
        )
    raise ValueError(f"ops must be 'kiln' or 'reference', got {name!r}")


class RMSNorm(nn.Module):
    """Holds a norm's weight; the norm itself is computed by the fused ops in `LlamaModel`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        # q, k and v in one matmul: one read of the activations instead of three.
        out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, out, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, positions: Tensor, rope: Tensor, ops: Any) -> Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        # Neox-style rotation (rotate halves) is Hugging Face Llama's layout: no weight permute.
        q, k = ops.rotary_embedding(positions, q, k, rope.to(q.dtype), True)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out: Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # [gate, up] stacked: the layout silu_and_mul reads.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, ops: Any) -> Tensor:
        out: Tensor = self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    """Decoder-only transformer: token ids [B, T] -> logits [B, T, vocab].

    Parameter names (the `model.safetensors` keys): `embed_tokens.weight`,
    `layers.N.{attn_norm,mlp_norm}.weight`, `layers.N.attn.{qkv_proj,o_proj}.weight`,
    `layers.N.mlp.{gate_up_proj,down_proj}.weight`, `norm.weight`, and `lm_head.weight` only
    when embeddings are untied. `qkv_proj` stacks q, k, v rows; `gate_up_proj` stacks gate, up.
    """

    def __init__(self, cfg: ModelConfig, *, ops: OpsName = "kiln") -> None:
        super().__init__()
        self.config = cfg
        self.ops_name = ops
        self.ops = load_ops(ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        rope = self.ops.rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope", rope, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        # Residual-branch outputs scaled by depth (GPT-2): the residual stream's variance stays
        # about constant with the number of layers at initialization.
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        ops, eps = self.ops, self.config.rms_norm_eps
        residual = self.embed_tokens(input_ids)
        blocks = cast(list[Block], list(self.layers))
        norms = [w for b in blocks for w in (b.attn_norm.weight, b.mlp_norm.weight)]
        norms.append(self.norm.weight)
        # Each sublayer's output is added to the residual and normed by the next norm in one op.
        x = ops.rms_norm(residual, _as(norms[0], residual), eps)
        for i, block in enumerate(blocks):
            a = block.attn(x, positions, self.rope, ops)
            x, residual = ops.fused_add_rms_norm(
                a.to(residual.dtype), residual, _as(norms[2 * i + 1], residual), eps
            )
            m = block.mlp(x, ops)
            x, residual = ops.fused_add_rms_norm(
                m.to(residual.dtype), residual, _as(norms[2 * i + 2], residual), eps
            )
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)


def _as(weight: Tensor, like: Tensor) -> Tensor:
    # The fused ops take one dtype for all inputs; a no-op outside autocast.
    return weight if weight.dtype == like.dtype else weight.to(like.dtype)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy in float32 (bf16 logits would round the loss)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
