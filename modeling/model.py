"""The Llama-architecture model: one forward pass that training, prefill and decode all run.

The modules (`Block`, `Attention`, `MLP`) hold the weights and own the forward. What differs
between the three passes is handed to them in a `Run`, chosen once at load, not branched on:

- `ops`: the fused kernels' forms. `FunctionalOps` (training: autograd, autocast) or `InPlaceOps`
  (serving: norms and rotary in place, SwiGLU into a kept buffer, nothing allocated per step).
- `linear`: how a projection is computed (`modeling.linear`): `dense_linear` for training and
  prefill, batch-invariant `DecodeLinears` for decode.
- `attention`: the attention backend (`modeling.attention`): `CausalSDPA` for training,
  `CachedPrefill`, `KernelDecodeAttention` or `PaddedDecodeAttention` over a KV cache.

`LlamaModel(cfg)(input_ids)` is training's forward; `inference.decoder.Decoder` runs the same
blocks through `LlamaModel.hidden` with its own `Run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.attention import (
    AttentionBackend,
    CausalSDPA,
    DocumentCausalSDPA,
    document_positions,
)
from modeling.config import ModelConfig
from modeling.linear import dense_linear
from modeling.loss import TiedGradient, linear_cross_entropy, tied_embedding
from modeling.rope import rope_table

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


# ------------------------------------------------------------------------------------------------
# what a pass runs with


@dataclass(frozen=True, slots=True)
class Run:
    """One forward pass's inputs besides the activations: token positions, the rotary table, and
    the implementations chosen for this kind of pass (see the module docstring)."""

    positions: Tensor
    rope: Tensor
    ops: FunctionalOps | InPlaceOps
    linear: Callable[[nn.Module, Tensor], Tensor]
    attention: AttentionBackend


def _as(weight: Tensor, like: Tensor) -> Tensor:
    # The fused ops take one dtype for all inputs; a no-op outside autocast.
    return weight if weight.dtype == like.dtype else weight.to(like.dtype)


class FunctionalOps:
    """Training's forms of the fused ops: new outputs, autograd, weights cast under autocast."""

    def __init__(self, ops: Any, eps: float) -> None:
        self.ops, self.eps = ops, eps

    def embed(self, embedding: nn.Embedding, input_ids: Tensor) -> Tensor:
        return self.cast_embedding(embedding(input_ids))

    @staticmethod
    def cast_embedding(out: Tensor) -> Tensor:
        if out.dtype != torch.float32 and torch.is_autocast_enabled(out.device.type):
            # A bf16-stored (frozen) embedding under autocast: the residual stream stays
            # float32, as it is with float32 weights.
            out = out.float()
        return out

    def add_norm(self, x: Tensor, residual: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual); the first layer's (residual None) norms x."""
        if residual is None:
            return self.ops.rms_norm(x, _as(norm.weight, x), self.eps), x
        out: tuple[Tensor, Tensor] = self.ops.fused_add_rms_norm(
            x.to(residual.dtype), residual, _as(norm.weight, residual), self.eps
        )
        return out

    def rotary(
        self, positions: Tensor, q: Tensor, k: Tensor, rope: Tensor
    ) -> tuple[Tensor, Tensor]:
        # Neox-style rotation (rotate halves) is Hugging Face Llama's layout: no weight permute.
        out: tuple[Tensor, Tensor] = self.ops.rotary_embedding(
            positions, q, k, rope.to(q.dtype), True
        )
        return out

    def silu_and_mul(self, x: Tensor) -> Tensor:
        out: Tensor = self.ops.silu_and_mul(x)
        return out


class InPlaceOps:
    """Serving's forms: norms and rotary in place, SwiGLU into a buffer kept for up to `rows`
    rows, the norm and embedding weights read once at load (not through nn.Module attributes)."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        rows: int,
        embed_rows: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        from kernels import ops

        self.ops, self.eps = ops, model.config.rms_norm_eps
        # Served weights (`modeling.served`) look token rows up in the packed matrix.
        self._embed_rows = embed_rows
        self.weights: dict[nn.Module, Tensor] = {
            m: m.weight for m in model.modules() if isinstance(m, RMSNorm | nn.Embedding)
        }
        norm = model.norm.weight
        self._act = norm.new_empty(rows, model.config.intermediate_size)

    def embed(self, embedding: nn.Embedding, input_ids: Tensor) -> Tensor:
        if self._embed_rows is not None:
            return self._embed_rows(input_ids)
        return F.embedding(input_ids, self.weights[embedding])

    def add_norm(self, x: Tensor, residual: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        if residual is None:  # x (the embeddings, a new tensor) becomes the residual stream
            return self.ops.rms_norm(x, self.weights[norm], self.eps), x
        self.ops.fused_add_rms_norm_(x, residual, self.weights[norm], self.eps)
        return x, residual

    def rotary(
        self, positions: Tensor, q: Tensor, k: Tensor, rope: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.ops.rotary_embedding_(positions, q, k, rope, True)
        return q, k

    def silu_and_mul(self, x: Tensor) -> Tensor:
        if x.shape[0] > self._act.shape[0]:
            out: Tensor = self.ops.silu_and_mul(x)
            return out
        act = self._act[: x.shape[0]]
        self.ops.silu_and_mul_out(x, act)
        return act


# ------------------------------------------------------------------------------------------------
# the modules


class Module(nn.Module):
    """nn.Module whose submodules are also plain attributes. nn.Module's `__getattr__` (the path
    to a submodule) costs about a third of a kernel call, and a decode step reads ten a layer."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            self.__dict__[name] = modules[name]

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__.pop(name, None)


class RMSNorm(Module):
    """Holds a norm's weight; the norm itself is `Run.ops.add_norm`, fused with a residual add."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Attention(Module):
    """q, k and v in one projection, rotary positions, the pass's attention backend, the output
    projection. x is [..., hidden]: [B, T, .] in training, [T, .] in prefill, [B, .] in decode."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.split = [cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads]
        # q, k and v in one matmul: one read of the activations instead of three.
        out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: Tensor, run: Run) -> Tensor:
        qkv = run.linear(self.qkv_proj, x)
        qkv = qkv.view(*qkv.shape[:-1], -1, self.head_dim)
        q, k, v = qkv.split_with_sizes(self.split, dim=-2)
        q, k = run.ops.rotary(run.positions, q, k, run.rope)
        y = run.attention.forward(self.layer, q, k, v)
        return run.linear(self.o_proj, y.flatten(-2))


class MLP(Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # [gate, up] stacked: the layout silu_and_mul reads.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, run: Run) -> Tensor:
        return run.linear(self.down_proj, run.ops.silu_and_mul(run.linear(self.gate_up_proj, x)))


class Block(Module):
    """One layer. Each sublayer's output is added to the residual stream and normed by the next
    norm in one fused op, so a block takes the previous block's output and the stream separately
    (`residual` None for the first) and the model's final norm adds the last block's output."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, residual: Tensor | None, run: Run) -> tuple[Tensor, Tensor]:
        x, residual = run.ops.add_norm(x, residual, self.attn_norm)
        x = self.attn.forward(x, run)
        x, residual = run.ops.add_norm(x, residual, self.mlp_norm)
        return self.mlp.forward(x, run), residual


class LlamaModel(Module):
    """Decoder-only transformer: token ids [B, T] -> logits [B, T, vocab].

    Parameter names (the `model.safetensors` keys): `embed_tokens.weight`,
    `layers.N.{attn_norm,mlp_norm}.weight`, `layers.N.attn.{qkv_proj,o_proj}.weight`,
    `layers.N.mlp.{gate_up_proj,down_proj}.weight`, `norm.weight`, and `lm_head.weight` only
    when embeddings are untied; `layers.N.attn.qkv_proj.bias` with `qkv_bias`,
    `layers.N.attn.o_proj.bias` with `o_bias`. `qkv_proj` stacks q, k, v rows; `gate_up_proj`
    stacks gate, up. On disk they have Hugging Face's names, unfused (`modeling.hf`).
    """

    rope: Tensor  # the rotary cos/sin table, a buffer

    def __init__(self, cfg: ModelConfig, *, ops: OpsName = "kiln") -> None:
        super().__init__()
        self.config = cfg
        self.ops_name = ops
        self.ops = load_ops(ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.register_buffer("rope", rope_table(cfg), persistent=False)
        self.training_ops = FunctionalOps(self.ops, cfg.rms_norm_eps)
        self.causal = CausalSDPA(cfg)
        self.document_attention = DocumentCausalSDPA(cfg)
        # Training's projection: `dense_linear`, or one that adds adapters (training.lora).
        self.linear: Callable[[nn.Module, Tensor], Tensor] = dense_linear
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        # Residual-branch outputs scaled by depth (GPT-2): the residual stream's variance stays
        # about constant with the number of layers at initialization.
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @property
    def head(self) -> nn.Module:
        """The module whose weight projects to the vocabulary (the embedding when tied)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        targets: Tensor | None = None,
        documents: Tensor | None = None,
    ) -> Tensor:
        """Training's pass: full causal attention over each sequence, no cache.

        Without `targets`, the logits [B, T, vocab]. With targets [B, T] (`IGNORE_INDEX` where a
        token has none), the mean cross entropy over them, the output projection fused with the
        loss a chunk of tokens at a time (`modeling.loss`): the logits are never held whole.
        The loss is computed here, inside the model's forward, so that a wrapper (DDP, FSDP,
        torch.compile) sees the head's weight used within the pass it manages.

        `documents` [B, T] (each token's document number in its row, for packed sequences):
        attention stays within each document and positions restart at each document's start.
        """
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        attention: AttentionBackend = self.causal
        if documents is not None:
            self.document_attention.set_documents(documents)
            attention = self.document_attention
            if positions is None:
                positions = document_positions(documents)
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        run = Run(positions, self.rope, self.training_ops, self.linear, attention)
        if targets is None:
            return run.linear(self.head, self.hidden(input_ids, run))
        head = self.head
        weight = head.weight
        tied = None
        if head is self.embed_tokens and weight.requires_grad and torch.is_grad_enabled():
            # One [V, H] gradient for the tied weight, not the head's, the embedding's and
            # their sum (`modeling.loss.TiedGradient`).
            tied = TiedGradient()
            x = self.training_ops.cast_embedding(tied_embedding(input_ids, weight, tied))
            hidden = self.layer_stack(x, run)
        else:
            hidden = self.hidden(input_ids, run)
        return linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=getattr(head, "bias", None),  # type: ignore[arg-type]
            tied=tied,
        )

    def hidden(
        self,
        input_ids: Tensor,
        run: Run,
        blocks: Iterable[Callable[[Tensor, Tensor | None, Run], tuple[Tensor, Tensor]]]
        | None = None,
    ) -> Tensor:
        """The final-normed hidden states of `input_ids` [...]: the pass every workload runs.
        `blocks` defaults to the layers themselves; serving passes their bound `forward`s
        (nn.Module's `__call__` checks for hooks, ~1 us a layer per decode step)."""
        return self.layer_stack(run.ops.embed(self.embed_tokens, input_ids), run, blocks)

    def layer_stack(
        self,
        x: Tensor,
        run: Run,
        blocks: Iterable[Callable[[Tensor, Tensor | None, Run], tuple[Tensor, Tensor]]]
        | None = None,
    ) -> Tensor:
        """The blocks and the final norm over the embeddings x."""
        residual = None
        for block in self.layers if blocks is None else blocks:
            x, residual = block(x, residual, run)
        x, _ = run.ops.add_norm(x, residual, self.norm)
        return x


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy in float32 (bf16 logits would round the loss)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
