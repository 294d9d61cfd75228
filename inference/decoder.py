"""The serving forward pass: training's Llama weights run with a slot-based KV cache.

Training's `LlamaModel` recomputes the whole sequence on every call; serving keeps each
sequence's keys and values in a preallocated cache slot, so a decode step reads one new token
per sequence. The arithmetic is the same (kiln's fused ops, grouped-query attention, tied or
untied head), so the logits match the training model's to float tolerance.

Batch invariance: a sequence's logits must not depend on which other sequences share its decode
step (greedy output identical alone and among 32 requests). Two things would break it:

- A GEMM's kernel (and so its summation order) changes with the row count: MKL's plain sgemm
  sums one row, 2-10 rows and more rows three different ways. On CPU in float32 with the kiln
  kernels built, decode projections run kiln's `panel_linear` (`PanelLinear`), which sums every
  output as one chain of multiply-adds over the inputs in order whatever the row count: any batch
  runs at its own size, a lone sequence at one row. Elsewhere (no extension, a GPU) they use
  padded row counts (`RowLinear`: 2, 8, 32, ...) with, on CPU, MKL's packed GEMM, whose
  summation depends on the CPU: on Intel Xeons one way for every row count from 2 up; on AMD
  EPYC 2-3 rows one way and 4 and more another. `Decoder.check_invariance` verifies at load time
  that a row's result does not depend on its position, its neighbours or the row count, and where
  it does, moves to padded row counts, then raises the smallest (4, 8, ...) until it does not;
  at worst (a GPU, another BLAS) every step runs at one fixed row count.
- Attention: with the CPU kernels, kiln's `decode_attention` runs each sequence over its own
  cache slot and length, on its own. Elsewhere it runs over each slot's cache up to a shared
  length (the batch's longest, rounded up); positions past a sequence's own length are masked to
  exact zeros, which leave its sums as they are. The invariance tests cover both paths.

Prefill (one sequence at a time, its own shapes) needs no such care and uses the fastest kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.config import ModelConfig
from modeling.model import LlamaModel, load_ops

log = logging.getLogger(__name__)

# Attention lengths are rounded up to a multiple of this: few distinct shapes, little work
# wasted on masked positions (64 cost ~5% more per step at 32 sequences of ~100 tokens).
ATTENTION_BLOCK = 16


def _mkl_packing_available() -> bool:
    return hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear")


def row_buckets(max_rows: int, smallest: int = 2) -> list[int]:
    """The padded row counts of decode GEMMs: smallest, x4, x16, ..., capped by max_rows
    (2, 8, 32 for 32 slots)."""
    buckets, rows = [], smallest
    while rows < max_rows:
        buckets.append(rows)
        rows *= 4
    return [*buckets, max(max_rows, smallest)]


class RowLinear:
    """`x [B, K] @ weight.T` for decode, padded to a fixed row count so a row's sums never change.

    With `buckets` [2, 8, 32] a step of 5 rows runs at 8. On CPU each bucket has the weight
    pre-packed for its row count (MKL's packed GEMM, which torch.compile also uses for fp32
    linears): it is faster than the plain GEMM at these shapes, and it sums every row the same
    way at every row count >= 2. Elsewhere there is one bucket, the largest.
    """

    def __init__(self, weight: Tensor, buckets: list[int]) -> None:
        self.weight = weight
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        self.packed: dict[int, Tensor] = {}
        if cpu_fp32 and _mkl_packing_available():
            self.packed = {
                rows: torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) for rows in buckets
            }
        else:
            buckets = buckets[-1:]
        self.buckets = buckets
        self._input = torch.zeros(
            buckets[-1], weight.shape[1], device=weight.device, dtype=weight.dtype
        )
        # Per batch size: its bucket, the padded input view and the packed weight. A decode
        # step calls this 5 times per layer, so the lookups are precomputed.
        self._plan: list[tuple[int, Tensor, Tensor | None]] = []
        for b in range(buckets[-1] + 1):
            rows = next(r for r in buckets if r >= b)
            self._plan.append((rows, self._input[:rows], self.packed.get(rows)))
        self._mkl_linear = torch.ops.mkl._mkl_linear.default if self.packed else None

    def __call__(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        rows, padded, packed = self._plan[b]
        if rows == b:
            padded = x
        else:
            # Rows past b keep whatever an earlier step left there: finite, and never read back.
            padded[:b] = x
        if packed is not None:
            out = self._mkl_linear(padded, packed, self.weight, None, rows)  # type: ignore[misc]
        else:
            out = F.linear(padded, self.weight)
        return out if rows == b else out[:b]

    def check_invariance(self) -> bool:
        """Whether a row's result is bitwise the same at every row count, position and company."""
        return _same_in_any_batch(self, self.weight, self.buckets)


class PanelLinear:
    """`x [B, K] @ weight.T` for decode through kiln's `panel_linear` (CPU, float32): batch-
    invariant by construction at any row count, so nothing is padded."""

    def __init__(self, weight: Tensor, max_rows: int, ops: Any, *, reuse_output: bool) -> None:
        self.weight = weight
        self.buckets: list[int] = []  # no padded row counts
        self.out_features = weight.shape[0]
        self.panels = ops.pack_panels(weight)
        self.max_rows = max_rows
        # With reuse_output a call returns a view of one buffer that the next call overwrites
        # (the projections inside a step); without, a new tensor (the logits a step returns).
        self._out = torch.empty(max_rows, self.out_features) if reuse_output else None
        self._op = torch.ops.kiln.panel_linear.default
        self._op_out = torch.ops.kiln.panel_linear_out.default

    def __call__(self, x: Tensor) -> Tensor:
        if self._out is None or x.shape[0] > self.max_rows:
            return self._op(x, self.panels, self.out_features)  # type: ignore[no-any-return]
        out = self._out[: x.shape[0]]
        self._op_out(x, self.panels, self.out_features, out)
        return out

    def check_invariance(self) -> bool:
        """Whether a row's result is bitwise the same at every row count, position and company."""
        rows = sorted({1, 2, 3, 5, 8, 13, self.max_rows} & set(range(1, self.max_rows + 1)))
        return _same_in_any_batch(self, self.weight, rows)


def _same_in_any_batch(linear: Any, weight: Tensor, row_counts: list[int]) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = weight.shape[1]
    probe = torch.randn(1, k, generator=gen).to(weight)
    alone = linear(probe)[0].clone()  # the next call may reuse the output's buffer
    for trial, rows in enumerate(row_counts + row_counts):
        batch = torch.randn(rows, k, generator=gen).to(weight)
        position = (trial * 7919) % rows
        batch[position] = probe[0]
        if not torch.equal(linear(batch)[position], alone):
            return False
    return True


@dataclass
class LayerWeights:
    attn_norm: Tensor
    qkv: Tensor
    o: Tensor
    mlp_norm: Tensor
    gate_up: Tensor
    down: Tensor
    # The same projections for decode steps (q rows pre-scaled by 1/sqrt(head_dim)).
    qkv_rows: RowLinear | PanelLinear | None = None
    o_rows: RowLinear | PanelLinear | None = None
    gate_up_rows: RowLinear | PanelLinear | None = None
    down_rows: RowLinear | PanelLinear | None = None


class Decoder:
    """Prefill and batched decode over a KV cache of `slots` sequences of up to max_seq_len."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        buckets: list[int] | None = None,
    ) -> None:
        cfg: ModelConfig = model.config
        self.config = cfg
        self.device, self.dtype = device, dtype
        self.slots = slots
        self.ops: Any = load_ops("kiln")
        self.eps = cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.scale = cfg.head_dim**-0.5

        def w(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.layers = [
            LayerWeights(
                attn_norm=w(layer.attn_norm.weight),
                qkv=w(layer.attn.qkv_proj.weight),
                o=w(layer.attn.o_proj.weight),
                mlp_norm=w(layer.mlp_norm.weight),
                gate_up=w(layer.mlp.gate_up_proj.weight),
                down=w(layer.mlp.down_proj.weight),
            )
            for layer in model.layers
        ]
        self.embed = w(model.embed_tokens.weight)
        self.head = self.embed if model.lm_head is None else w(model.lm_head.weight)
        self.final_norm = w(model.norm.weight)
        self.rope = model.rope.to(device=device, dtype=dtype).contiguous()
        panels = (
            buckets is None
            and device.type == "cpu"
            and dtype == torch.float32
            and self.ops.HAVE_CPU_DECODE_OPS
        )
        self._build_decode_linears(None if panels else (buckets or row_buckets(slots)))
        # kiln's decode_attention: each sequence over its own length, batch-invariant; it and
        # the SwiGLU write into buffers kept across steps.
        self.attention_kernel = panels
        if panels:
            self._attention_out = torch.empty(slots, cfg.num_heads, cfg.head_dim)
            self._mlp_act = torch.empty(slots, cfg.intermediate_size)
        shape = (slots, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)
        # Keys and values of a layer in one tensor, so a decode step writes both in one copy.
        self.kv_cache = [torch.zeros((2, *shape), device=device, dtype=dtype) for _ in self.layers]
        self.k_cache = [kv[0] for kv in self.kv_cache]
        self.v_cache = [kv[1] for kv in self.kv_cache]

    def _build_decode_linears(self, buckets: list[int] | None) -> None:
        """Padded RowLinears at `buckets`, or PanelLinears (no padding) for None."""
        q_rows = self.num_heads * self.head_dim
        self.buckets = [] if buckets is None else buckets

        def linear(weight: Tensor, reuse_output: bool = True) -> RowLinear | PanelLinear:
            if buckets is None:
                return PanelLinear(weight, self.slots, self.ops, reuse_output=reuse_output)
            return RowLinear(weight, buckets)

        for layer in self.layers:
            # Scaling q's rows here saves a pass over every score in each decode step.
            scaled_qkv = layer.qkv.clone()
            scaled_qkv[:q_rows] *= self.scale
            layer.qkv_rows = linear(scaled_qkv)
            layer.o_rows = linear(layer.o)
            layer.gate_up_rows = linear(layer.gate_up)
            layer.down_rows = linear(layer.down)
        self.head_rows = linear(self.head, reuse_output=False)

    def _decode_linears(self) -> list[RowLinear | PanelLinear]:
        linears = [self.head_rows]
        for layer in self.layers:
            linears += [layer.qkv_rows, layer.o_rows, layer.gate_up_rows, layer.down_rows]  # type: ignore[list-item]
        return linears

    def check_invariance(self) -> bool:
        """Whether decode projections give a row the same result in any batch. Where the padded
        row counts sum differently (the small ones, on some CPUs), drops the smallest until the
        rest agree, down to one row count for every step."""
        while not all(linear.check_invariance() for linear in self._decode_linears()):
            if not self.buckets:
                log.warning("kiln panel_linear is not batch-invariant here: padding row counts")
                self._build_decode_linears(row_buckets(self.slots))
                continue
            if len(self.buckets) == 1:
                return False
            smallest = self.buckets[0] * 2
            buckets = row_buckets(self.slots, smallest) if smallest < self.slots else [self.slots]
            log.warning(
                "decode GEMMs sum a row differently at %s rows on this machine: using %s",
                self.buckets,
                buckets,
            )
            self._build_decode_linears(buckets)
        return True

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_cache)

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

    def decode(self, slots: list[int], positions: list[int], token_ids: list[int]) -> Tensor:
        """One step for B sequences: token_ids [B] at positions [B] in slots [B] -> logits [B, V].

        `slots` must be sorted ascending; a row's result does not depend on the other rows.
        """
        ops, eps, device = self.ops, self.eps, self.device
        b = len(token_ids)
        slots_t = torch.tensor(slots, device=device)
        positions_t = torch.tensor(positions, device=device)
        attend = self.attention_kernel
        if attend:
            lengths_t = positions_t + 1
        else:
            span = slots[-1] + 1  # attention runs over slots [0, span): a view, not a gather
            dense = span == b
            length = min(
                self.max_seq_len, -(-(max(positions) + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK
            )
            # Positions past each slot's own length are masked (an idle slot masks everything
            # but position 0, so its softmax stays finite; its output is never read).
            lengths = [1] * span
            for slot, position in zip(slots, positions, strict=True):
                lengths[slot] = position + 1
            visible = (
                torch.arange(length, device=device) < torch.tensor(lengths, device=device)[:, None]
            )
            bias = torch.where(visible, 0.0, float("-inf")).to(self.dtype).view(span, 1, 1, length)
        # The rows of a layer's cache, viewed as [2 * slots * kv_heads * max_seq_len, head_dim],
        # that this step writes, in the order of qkv's k and v heads: one index_copy_ per layer.
        t = self.max_seq_len
        per_slot, values = self.num_kv_heads * t, self.slots * self.num_kv_heads * t
        heads = [h * t for h in range(self.num_kv_heads)]
        rows = torch.tensor(
            [base + s * per_slot + h + p for s, p in zip(slots, positions, strict=True)
             for base in (0, values) for h in heads],
            device=device,
        )  # fmt: skip
        token_ids_t = torch.tensor(token_ids, device=device)

        residual = F.embedding(token_ids_t, self.embed)
        x = ops.rms_norm(residual, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv_rows(x).view(b, -1, self.head_dim)  # type: ignore[misc]
            q, k = qkv[:, : self.num_heads], qkv[:, self.num_heads : -self.num_kv_heads]
            ops.rotary_embedding_(positions_t, q, k, self.rope, True)
            kc, vc = self.k_cache[i], self.v_cache[i]
            new_kv = qkv[:, self.num_heads :].reshape(-1, self.head_dim)  # k (rotated), then v
            self.kv_cache[i].view(-1, self.head_dim).index_copy_(0, rows, new_kv)
            if attend:
                out = self._attention_out[:b]
                ops.decode_attention_out(q, kc, vc, slots_t, lengths_t, 1.0, out)
            else:
                query = q.reshape(b, self.num_kv_heads, self.group, self.head_dim)
                if not dense:
                    full = query.new_zeros(span, self.num_kv_heads, self.group, self.head_dim)
                    full[slots_t] = query
                    query = full
                scores = torch.matmul(query, kc[:span, :, :length].transpose(-1, -2)).add_(bias)
                out = torch.matmul(torch.softmax(scores, dim=-1), vc[:span, :, :length])
                if not dense:
                    out = out[slots_t]
            a = layer.o_rows(out.reshape(b, -1))  # type: ignore[misc]
            ops.fused_add_rms_norm_(a, residual, layer.mlp_norm, eps)
            gate_up = layer.gate_up_rows(a)  # type: ignore[misc]
            if attend:
                act = self._mlp_act[:b]
                ops.silu_and_mul_out(gate_up, act)
            else:
                act = ops.silu_and_mul(gate_up)
            m = layer.down_rows(act)  # type: ignore[misc]
            ops.fused_add_rms_norm_(m, residual, self._next_norm(i), eps)
            x = m
        return self.head_rows(x).float()
