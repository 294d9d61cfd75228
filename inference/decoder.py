"""The serving forward pass: training's Llama weights run with a slot-based KV cache.

Training's `LlamaModel` recomputes the whole sequence on every call; serving keeps each
sequence's keys and values in a preallocated cache slot, so a decode step reads one new token
per sequence. The arithmetic is the same (kiln's fused ops, grouped-query attention, tied or
untied head), so the logits match the training model's to float tolerance.

Batch invariance: a sequence's logits must not depend on which other sequences share its decode
step (greedy output identical alone and among 32 requests). Two things would break it:

- A GEMM's kernel (and so its summation order) changes with the row count: MKL sums one row, 2-10
  rows and more rows three different ways. Decode projections therefore run in tiles of one
  fixed row count (`TiledLinear`); `Decoder.check_invariance` verifies at load time that a
  row's result is then independent of its position and its neighbours.
- Attention runs over each slot's cache up to a shared length (the batch's longest, rounded up);
  positions past a sequence's own length are masked to exact zeros, which leave its sums as they
  are. The invariance tests cover both.

Prefill (one sequence at a time, its own shapes) needs no such care and uses the fastest kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import ModelConfig
from training.model import LlamaModel, load_ops

log = logging.getLogger(__name__)

# Attention lengths are rounded up to a multiple of this, so the shapes a decode step sees (and
# the work it wastes on masked positions) stay few.
ATTENTION_BLOCK = 64
# Rows per decode GEMM on CPU: a lone sequence costs ~0.8 ms of projections per step on two
# cores here at 8 rows (vs ~2 ms at 32), and 32 sequences cost four tiles (~3.1 ms, vs ~2 ms).
DECODE_TILE_CPU = 8


def _mkl_packing_available() -> bool:
    return hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear")


class TiledLinear:
    """`x [B, K] @ weight.T` computed in tiles of exactly `tile` rows (the last one padded).

    A GEMM's kernel choice (and so its summation order) depends on the row count; at one fixed
    tile shape every row is summed the same way wherever it sits, so a sequence's result does
    not depend on how many others share its step. Small tiles keep a lone request fast (it pays
    for `tile` rows, not for the whole batch); on CPU the weight is pre-packed for the tile
    (MKL's packed GEMM, which torch.compile also uses for fp32 linears).
    """

    def __init__(self, weight: Tensor, tile: int, max_rows: int) -> None:
        self.weight, self.tile = weight, tile
        self.packed: Tensor | None = None
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        if cpu_fp32 and _mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, tile)
        tiles = -(-max_rows // tile)
        self._input = torch.zeros(
            tiles * tile, weight.shape[1], device=weight.device, dtype=weight.dtype
        )

    def _one(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.tile)
        return F.linear(x, self.weight)

    def __call__(self, x: Tensor) -> Tensor:
        b, tile = x.shape[0], self.tile
        rows = -(-b // tile) * tile
        if rows == b:
            padded = x.contiguous()
        else:
            # Rows past b keep whatever an earlier step left there: finite, and never read back.
            padded = self._input[:rows]
            padded[:b].copy_(x)
        if rows == tile:
            return self._one(padded)[:b]
        parts = [self._one(padded[i : i + tile]) for i in range(0, rows, tile)]
        return torch.cat(parts)[:b]

    def check_invariance(self, trials: int = 4) -> bool:
        """Whether a row's result is bitwise the same wherever it sits and whatever is beside it."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        k, rows = self.weight.shape[1], self._input.shape[0]
        probe = torch.randn(1, k, generator=gen).to(self.weight)
        alone = self(probe)
        for trial in range(trials):
            others = torch.randn(rows, k, generator=gen).to(self.weight)
            position = (trial * 7919) % rows
            others[position] = probe[0]
            batch = others[: max(position + 1, rows - trial)]
            if not torch.equal(self(batch)[position], alone[0]):
                return False
        return True


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Tensor
    qkv: Tensor
    o: Tensor
    mlp_norm: Tensor
    gate_up: Tensor
    down: Tensor
    # The same projections for decode steps, in fixed-size row tiles.
    qkv_rows: TiledLinear
    o_rows: TiledLinear
    gate_up_rows: TiledLinear
    down_rows: TiledLinear


class Decoder:
    """Prefill and batched decode over a KV cache of `slots` sequences of up to max_seq_len."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        decode_tile: int | None = None,
    ) -> None:
        cfg: ModelConfig = model.config
        self.config = cfg
        self.device, self.dtype = device, dtype
        self.slots = slots
        self.ops: Any = load_ops("kiln")

        # CPU: small tiles, so a lone sequence pays for a few rows; GPU: one tile for the whole
        # batch (rows are nearly free there, kernel launches are not).
        tile = decode_tile or (DECODE_TILE_CPU if device.type == "cpu" else slots)
        self.decode_tile = tile

        def w(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.layers = []
        for layer in model.layers:
            qkv, o = w(layer.attn.qkv_proj.weight), w(layer.attn.o_proj.weight)
            gate_up, down = w(layer.mlp.gate_up_proj.weight), w(layer.mlp.down_proj.weight)
            self.layers.append(
                LayerWeights(
                    attn_norm=w(layer.attn_norm.weight),
                    qkv=qkv,
                    o=o,
                    mlp_norm=w(layer.mlp_norm.weight),
                    gate_up=gate_up,
                    down=down,
                    qkv_rows=TiledLinear(qkv, tile, slots),
                    o_rows=TiledLinear(o, tile, slots),
                    gate_up_rows=TiledLinear(gate_up, tile, slots),
                    down_rows=TiledLinear(down, tile, slots),
                )
            )
        self.embed = w(model.embed_tokens.weight)
        self.head = self.embed if model.lm_head is None else w(model.lm_head.weight)
        self.head_rows = TiledLinear(self.head, tile, slots)
        self.final_norm = w(model.norm.weight)
        self.rope = model.rope.to(device=device, dtype=dtype).contiguous()
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.scale = cfg.head_dim**-0.5
        shape = (slots, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]

    def check_invariance(self) -> bool:
        """Whether every decode projection gives a row the same result wherever it sits."""
        linears = [self.head_rows]
        for layer in self.layers:
            linears += [layer.qkv_rows, layer.o_rows, layer.gate_up_rows, layer.down_rows]
        return all(linear.check_invariance() for linear in linears)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _next_norm(self, i: int) -> Tensor:
        # The norm after layer i's MLP: the next layer's input norm, or the final one.
        return self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(self, slot: int, token_ids: Tensor, start: int = 0) -> Tensor:
        """Runs `token_ids` [T] at positions start.. into `slot`; returns the last logits [V]."""
        ops, eps = self.ops, self.eps
        t = token_ids.shape[0]
        end = start + t
        positions = torch.arange(start, end, device=self.device)
        residual = F.embedding(token_ids.to(self.device), self.embed)
        x = ops.rms_norm(residual, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv).view(t, -1, self.head_dim)
            q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
            ops.rotary_embedding_(positions, q, k, self.rope, True)
            self.k_cache[i][slot, :, start:end] = k.transpose(0, 1)
            self.v_cache[i][slot, :, start:end] = v.transpose(0, 1)
            keys = self.k_cache[i][slot, :, :end].unsqueeze(0)
            values = self.v_cache[i][slot, :, :end].unsqueeze(0)
            if start == 0:
                mask = None
            else:
                # Query row r (position start + r) sees every cached position up to its own.
                cols = torch.arange(end, device=self.device)
                mask = cols.unsqueeze(0) <= positions.unsqueeze(1)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.group > 1,
            )
            a = F.linear(attn.squeeze(0).transpose(0, 1).reshape(t, -1), layer.o)
            ops.fused_add_rms_norm_(a, residual, layer.mlp_norm, eps)
            m = F.linear(ops.silu_and_mul(F.linear(a, layer.gate_up)), layer.down)
            ops.fused_add_rms_norm_(m, residual, self._next_norm(i), eps)
            x = m
        return F.linear(x[-1:], self.head)[0].float()

    # -- decode ----------------------------------------------------------------------------------

    def decode(self, slots: Tensor, positions: Tensor, token_ids: Tensor) -> Tensor:
        """One step for B sequences: token_ids [B] at positions [B] in slots [B] -> logits [B, V].

        `slots` must be sorted ascending; a row's result does not depend on the other rows.
        """
        ops, eps = self.ops, self.eps
        b = token_ids.shape[0]
        span = int(slots[-1]) + 1  # attention runs over slots [0, span): a view, not a gather
        dense = span == b
        length = min(
            self.max_seq_len, -(-(int(positions.max()) + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK
        )
        # Positions past each slot's own length are masked (an idle slot masks everything but
        # position 0, so its softmax stays finite; its output is never read).
        lengths = torch.ones(span, dtype=torch.long, device=self.device)
        lengths[slots] = positions + 1
        masked = torch.arange(length, device=self.device).unsqueeze(0) >= lengths.unsqueeze(1)
        bias = torch.zeros(span, length, device=self.device, dtype=self.dtype)
        bias.masked_fill_(masked, float("-inf"))
        bias = bias.view(span, 1, 1, length)

        residual = F.embedding(token_ids, self.embed)
        x = ops.rms_norm(residual, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv_rows(x).view(b, -1, self.head_dim)
            q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
            ops.rotary_embedding_(positions, q, k, self.rope, True)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[slots, :, positions] = k
            vc[slots, :, positions] = v
            query = q.reshape(b, self.num_kv_heads, self.group, self.head_dim)
            if not dense:
                full = query.new_zeros(span, self.num_kv_heads, self.group, self.head_dim)
                full[slots] = query
                query = full
            scores = torch.matmul(query, kc[:span, :, :length].transpose(-1, -2))
            scores.mul_(self.scale).add_(bias)
            out = torch.matmul(torch.softmax(scores, dim=-1), vc[:span, :, :length])
            if not dense:
                out = out[slots]
            a = layer.o_rows(out.reshape(b, -1))
            ops.fused_add_rms_norm_(a, residual, layer.mlp_norm, eps)
            m = layer.down_rows(ops.silu_and_mul(layer.gate_up_rows(a)))
            ops.fused_add_rms_norm_(m, residual, self._next_norm(i), eps)
            x = m
        return self.head_rows(x).float()
