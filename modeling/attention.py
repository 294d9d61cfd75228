"""Attention backends and the KV cache: how a pass turns rotated q, k, v into attention outputs.

`Attention.forward` (modeling/model.py) projects, rotates and calls `Run.attention.forward(layer,
q, k, v)`; the backend is the pass's only attention code. q is [..., Hq, D], k and v [..., Hkv, D]
(grouped-query: Hq a multiple of Hkv); the result is [..., Hq, D] in q's layout.

- `CausalSDPA`: training, [B, T, H, D], full causal attention, no cache.
- `DocumentCausalSDPA`: training on packed documents, causal within each document only.
- `CachedPrefill`: one sequence's T tokens [T, H, D] written into its cache slot at
  positions start.., attending to the slot's cache up to each token's own position.
- `KernelDecodeAttention`: B sequences, one token each [B, H, D], kiln's `decode_attention_out`
  (CPU, float32): each sequence over its own slot and length, batch-invariant by construction.
- `PaddedDecodeAttention`: the same step as batched matmuls over each slot's cache up to a shared
  length (the batch's longest, rounded up); positions past a sequence's own length are masked to
  exact zeros, which leave its sums as they are, so it is batch-invariant too.

Serving backends are prepared once per step (`prepare`) and then called once per layer. A new
attention variant (a window, a score cap) is a change to the backends here, and only here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.config import ModelConfig

# Padded decode attention rounds lengths up to a multiple of this: few distinct shapes, little
# work wasted on masked positions (64 cost ~5% more per step at 32 sequences of ~100 tokens).
ATTENTION_BLOCK = 16


class AttentionBackend(Protocol):
    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of layer `layer` for rotated q [..., Hq, D], k and v [..., Hkv, D]."""
        ...


class KVCache:
    """Keys and values of `slots` sequences of up to max_seq_len, per layer, allocated once:
    `[2, slots, kv_heads, max_seq_len, head_dim]`, keys then values, so a decode step writes both
    of a layer in one `index_copy_`."""

    def __init__(
        self, cfg: ModelConfig, *, slots: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.slots, self.max_seq_len = slots, cfg.max_seq_len
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        shape = (2, slots, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.keys = [kv[0] for kv in self.kv]
        self.values = [kv[1] for kv in self.kv]
        self._rows = torch.empty(0, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def write_span(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> None:
        """Prefill: k, v [T, Hkv, D] at positions start..start+T of `slot`."""
        end = start + k.shape[0]
        self.keys[layer][slot, :, start:end] = k.transpose(0, 1)
        self.values[layer][slot, :, start:end] = v.transpose(0, 1)

    def prepare_rows(self, slots: list[int], positions: list[int]) -> None:
        """Decode: the rows of each layer's cache, viewed as [2 * slots * Hkv * max_seq_len, D],
        that this step's k and v heads go to, in qkv's order (per sequence: k heads, v heads)."""
        t = self.max_seq_len
        per_slot, values = self.num_kv_heads * t, self.slots * self.num_kv_heads * t
        heads = [h * t for h in range(self.num_kv_heads)]
        self._rows = torch.tensor(
            [base + s * per_slot + h + p for s, p in zip(slots, positions, strict=True)
             for base in (0, values) for h in heads],
            device=self._rows.device,
        )  # fmt: skip

    def write_rows(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Decode: k, v [B, Hkv, D] to the rows `prepare_rows` chose, in one copy.

        k and v are neighbouring heads of one projection output ([q heads | k heads | v heads]
        per row, rotated in place), so one strided view covers both.
        """
        b, h, d = k.shape
        kv = k.as_strided((b, 2 * h, d), k.stride())
        self.kv[layer].view(-1, d).index_copy_(0, self._rows, kv.reshape(-1, d))


class CausalSDPA:
    """Training: full causal attention over each sequence of the batch, [B, T, H, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.gqa = cfg.num_heads != cfg.num_kv_heads

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.gqa,
        )
        return y.transpose(1, 2)


class DocumentCausalSDPA:
    """Training over packed documents, [B, T, H, D]: a token attends to the earlier tokens of its
    own document only (a block-diagonal causal mask), never across a packing boundary.
    `documents` [B, T] numbers each token's document within its row (`set_documents`, per
    batch: the model holds one of these, so a compiled block sees the same object each step)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        self.mask = torch.empty(0, dtype=torch.bool)

    def set_documents(self, documents: Tensor) -> None:
        t = documents.shape[1]
        same = documents.unsqueeze(2) == documents.unsqueeze(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
        self.mask = (same & causal).unsqueeze(1)  # [B, 1, T, T], broadcast over the heads

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=self.mask,
            enable_gqa=self.gqa,
        )
        return y.transpose(1, 2)


def document_positions(documents: Tensor) -> Tensor:
    """Each token's position within its document ([B, T] document numbers, non-decreasing
    along a row): the rotary positions restart at 0 where a document starts."""
    t = documents.shape[1]
    index = torch.arange(t, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values
    return index - first


class CachedPrefill:
    """One sequence's tokens [T, H, D] at positions start.. into its cache slot; each attends to
    the slot's cached positions up to its own."""

    def __init__(self, cache: KVCache, cfg: ModelConfig) -> None:
        self.cache = cache
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        self.slot, self.start, self.end = 0, 0, 0
        self.mask: Tensor | None = None

    def prepare(self, slot: int, start: int, positions: Tensor) -> None:
        """positions: [T], start..start+T."""
        self.slot, self.start, self.end = slot, start, start + positions.shape[0]
        if self.start == 0:
            self.mask = None
        else:
            # Query row r (position start + r) sees every cached position up to its own.
            cols = torch.arange(self.end, device=positions.device)
            self.mask = cols.unsqueeze(0) <= positions.unsqueeze(1)

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, slot, end = self.cache, self.slot, self.end
        cache.write_span(layer, slot, self.start, k, v)
        y = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            cache.keys[layer][slot, :, :end].unsqueeze(0),
            cache.values[layer][slot, :, :end].unsqueeze(0),
            attn_mask=self.mask,
            is_causal=self.mask is None,
            enable_gqa=self.gqa,
        )
        return y.squeeze(0).transpose(0, 1)


class KernelDecodeAttention:
    """B sequences, one token each [B, H, D]: kiln's `decode_attention_out` runs each over its own
    slot and length (CPU, float32), into a buffer kept across steps."""

    def __init__(self, cache: KVCache, cfg: ModelConfig, ops: Any) -> None:
        self.cache = cache
        self.scale = cfg.head_dim**-0.5
        self._op = ops.decode_attention_out
        self._out = torch.empty(cache.slots, cfg.num_heads, cfg.head_dim)
        self._slots = self._lengths = torch.empty(0, dtype=torch.long)

    def prepare(self, slots: list[int], positions: list[int], positions_t: Tensor) -> None:
        self.cache.prepare_rows(slots, positions)
        self._slots = torch.tensor(slots, device=positions_t.device)
        self._lengths = positions_t + 1

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        cache.write_rows(layer, k, v)
        out = self._out[: q.shape[0]]
        self._op(
            q, cache.keys[layer], cache.values[layer], self._slots, self._lengths, self.scale, out
        )
        return out


class PaddedDecodeAttention:
    """B sequences, one token each [B, H, D], as masked batched matmuls over slots [0, span) up
    to a shared length: any device and dtype, batch-invariant through exact-zero masking."""

    def __init__(self, cache: KVCache, cfg: ModelConfig) -> None:
        self.cache = cache
        self.scale = cfg.head_dim**-0.5
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.span = self.length = 0
        self.dense = True
        self._slots = self._bias = torch.empty(0)

    def prepare(self, slots: list[int], positions: list[int], positions_t: Tensor) -> None:
        cache, device = self.cache, positions_t.device
        cache.prepare_rows(slots, positions)
        self.span = span = slots[-1] + 1  # attention runs over slots [0, span): a view, no gather
        self.dense = span == len(slots)
        self.length = min(
            cache.max_seq_len, -(-(max(positions) + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK
        )
        # Positions past each slot's own length are masked (an idle slot masks everything but
        # position 0, so its softmax stays finite; its output is never read).
        lengths = [1] * span
        for slot, position in zip(slots, positions, strict=True):
            lengths[slot] = position + 1
        visible = (
            torch.arange(self.length, device=device) < torch.tensor(lengths, device=device)[:, None]
        )
        dtype = cache.kv[0].dtype
        self._bias = torch.where(visible, 0.0, float("-inf")).to(dtype).view(span, 1, 1, -1)
        self._slots = torch.tensor(slots, device=device)

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, span, length = self.cache, self.span, self.length
        cache.write_rows(layer, k, v)
        b = q.shape[0]
        query = (q * self.scale).view(b, self.num_kv_heads, self.group, self.head_dim)
        if not self.dense:
            full = query.new_zeros(span, self.num_kv_heads, self.group, self.head_dim)
            full[self._slots] = query
            query = full
        keys = cache.keys[layer][:span, :, :length]
        scores = torch.matmul(query, keys.transpose(-1, -2)).add_(self._bias)
        out = torch.matmul(torch.softmax(scores, dim=-1), cache.values[layer][:span, :, :length])
        if not self.dense:
            out = out[self._slots]
        return out.view(b, -1, self.head_dim)
