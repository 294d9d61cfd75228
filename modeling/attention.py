"""Attention backends and the KV cache: how a pass turns rotated q, k, v into attention outputs.

`Attention.forward` (modeling/model.py) projects, rotates and calls `Run.attention.forward(layer,
q, k, v)`; the backend is the pass's only attention code. q is [..., Hq, D], k and v [..., Hkv, D]
(grouped-query: Hq a multiple of Hkv); the result is [..., Hq, D] in q's layout.

- `CausalSDPA`: training, [B, T, H, D], full causal attention, no cache.
- `DocumentCausalSDPA`: training on packed documents, causal within each document only.
- `CachedPrefill`: one sequence's T tokens [T, H, D] written into its cache blocks at
  positions start.., attending to its cached positions up to each token's own.
- `KernelDecodeAttention`: B sequences, one token each [B, H, D], kiln's
  `paged_decode_attention_out` (CPU float32, or CUDA): each sequence over its own blocks and
  length, read through its block table, batch-invariant by construction.
- `PaddedDecodeAttention`: the same step as batched matmuls over each sequence's blocks gathered
  up to a shared length (the batch's longest, rounded up); positions past a sequence's own length
  are masked to exact zeros, which leave its sums as they are, so it is batch-invariant too.

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
    """Keys and values in fixed-size blocks of `block_size` positions, per layer, allocated once:
    `[2, blocks, kv_heads, block_size, head_dim]`, keys then values, so a decode step writes both
    of a layer in one `index_copy_`. A sequence's positions live in the blocks its block table
    lists: position p at row p % block_size of block table[p // block_size]."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.blocks, self.block_size, self.max_seq_len = blocks, block_size, cfg.max_seq_len
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        shape = (2, blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.keys = [kv[0] for kv in self.kv]
        self.values = [kv[1] for kv in self.kv]
        self.device = torch.device(device)
        # Per sequence, where its k heads then v heads go relative to its position's row.
        self._head_rows = torch.tensor(
            [base + h * block_size
             for base in (0, blocks * cfg.num_kv_heads * block_size)
             for h in range(cfg.num_kv_heads)],
            device=device,
        )  # fmt: skip

    @staticmethod
    def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block over every layer (keys and values)."""
        per = torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * per

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def span_index(self, table: list[int], start: int, end: int) -> tuple[Tensor, Tensor]:
        """(block, row) of positions start..end of a sequence with this block table."""
        bs = self.block_size
        device = self.device
        positions = torch.arange(start, end)
        blocks = torch.tensor(table[: -(-end // bs)], dtype=torch.long)[positions // bs]
        return blocks.to(device), (positions % bs).to(device)

    def write_span(self, layer: int, where: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Prefill: k, v [T, Hkv, D] at the (block, row) pairs `span_index` gave."""
        blocks, rows = where
        self.keys[layer][blocks, :, rows] = k
        self.values[layer][blocks, :, rows] = v

    def gather(self, layer: int, blocks: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of one sequence's blocks [n] as [Hkv, length, D] (a copy)."""
        n = blocks.shape[0]
        shape = (self.num_kv_heads, n * self.block_size, self.head_dim)
        k = self.keys[layer][blocks].transpose(0, 1).reshape(shape)[:, :length]
        v = self.values[layer][blocks].transpose(0, 1).reshape(shape)[:, :length]
        return k, v

    def prepare_rows(self, tables: list[list[int]], positions: list[int]) -> Tensor:
        """Decode: the rows of each layer's cache, viewed as [2 * blocks * Hkv * block_size, D],
        that this step's k and v heads go to, in qkv's order (per sequence: k heads, v heads)."""
        bs = self.block_size
        per_block, values = self.num_kv_heads * bs, self.blocks * self.num_kv_heads * bs
        heads = [h * bs for h in range(self.num_kv_heads)]
        return torch.tensor(
            [base + t[p // bs] * per_block + h + p % bs
             for t, p in zip(tables, positions, strict=True)
             for base in (0, values) for h in heads],
            device=self.device,
        )  # fmt: skip

    def rows_into(self, tables: Tensor, positions: Tensor, out: Tensor) -> None:
        """`prepare_rows` on the device, into `out` [B * 2 * Hkv], from block tables [B, W] and
        positions [B] already there: nothing read back to the host, nothing of a size that
        depends on the values (a CUDA graph captures it)."""
        bs = self.block_size
        block = tables.gather(1, torch.div(positions, bs, rounding_mode="floor").unsqueeze(1))
        first = block * (self.num_kv_heads * bs) + positions.remainder(bs).unsqueeze(1)  # [B, 1]
        heads = self._head_rows
        torch.add(first, heads, out=out.view(-1, heads.shape[0]))

    def write_rows(self, layer: int, k: Tensor, v: Tensor, rows: Tensor) -> None:
        """Decode: k, v [B, Hkv, D] to the cache rows `rows` (`prepare_rows`), in one copy.

        k and v are neighbouring heads of one projection output ([q heads | k heads | v heads]
        per row, rotated in place), so one strided view covers both.
        """
        b, h, d = k.shape
        kv = k.as_strided((b, 2 * h, d), k.stride())
        self.kv[layer].view(-1, d).index_copy_(0, rows, kv.reshape(-1, d))


def table_tensor(tables: list[list[int]], width: int, device: torch.device) -> Tensor:
    """Block tables [B, width] int64, each padded with block 0 (entries past a sequence's length
    are never read, or are masked)."""
    return torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], device=device)


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
    """One sequence's tokens [T, H, D] at positions start.. into its cache blocks; each attends
    to the sequence's cached positions up to its own (gathered from its blocks)."""

    def __init__(self, cache: KVCache, cfg: ModelConfig) -> None:
        self.cache = cache
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        self.start, self.end = 0, 0
        self.mask: Tensor | None = None
        self._where = (torch.empty(0), torch.empty(0))
        self._blocks = torch.empty(0)

    def prepare(self, table: list[int], start: int, positions: Tensor) -> None:
        """positions: [T], start..start+T; table: the sequence's blocks, covering them."""
        self.start, self.end = start, start + positions.shape[0]
        cache = self.cache
        self._where = cache.span_index(table, self.start, self.end)
        n = -(-self.end // cache.block_size)
        self._blocks = torch.tensor(table[:n], dtype=torch.long, device=positions.device)
        if self.start == 0:
            self.mask = None
        else:
            # Query row r (position start + r) sees every cached position up to its own.
            cols = torch.arange(self.end, device=positions.device)
            self.mask = cols.unsqueeze(0) <= positions.unsqueeze(1)

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        cache.write_span(layer, self._where, k, v)
        if self.start == 0:
            # The whole sequence is this chunk: attend to k and v as they are, no gather.
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            keys, values = cache.gather(layer, self._blocks, self.end)
        y = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=self.mask,
            is_causal=self.mask is None,
            enable_gqa=self.gqa,
        )
        return y.squeeze(0).transpose(0, 1)


class KernelDecodeAttention:
    """B sequences, one token each [B, H, D]: kiln's `paged_decode_attention_out` runs each over
    its own blocks and length (CPU, float32), into a buffer kept across steps."""

    def __init__(self, cache: KVCache, cfg: ModelConfig, ops: Any, rows: int) -> None:
        self.cache = cache
        self.scale = cfg.head_dim**-0.5
        self._op = ops.paged_decode_attention_out
        kv = cache.kv[0]
        self._out = torch.empty(rows, cfg.num_heads, cfg.head_dim, device=kv.device, dtype=kv.dtype)
        self._tables = self._lengths = self._rows = torch.empty(0, dtype=torch.long)

    def prepare(self, tables: list[list[int]], positions: list[int], positions_t: Tensor) -> None:
        cache = self.cache
        self._rows = cache.prepare_rows(tables, positions)
        width = -(-(max(positions) + 1) // cache.block_size)
        self._tables = table_tensor(tables, width, positions_t.device)
        self._lengths = positions_t + 1

    def bind(self, tables: Tensor, lengths: Tensor, rows: Tensor) -> None:
        """Reads the step's block tables [B, W], lengths [B] and cache rows [B * 2 * Hkv] from
        these device tensors (fixed buffers that `inference.graphs` refills each step) instead
        of `prepare`'s."""
        self._tables, self._lengths, self._rows = tables, lengths, rows

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        cache.write_rows(layer, k, v, self._rows)
        out = self._out[: q.shape[0]]
        self._op(
            q, cache.keys[layer], cache.values[layer], self._tables, self._lengths, self.scale, out
        )
        return out


class PaddedDecodeAttention:
    """B sequences, one token each [B, H, D], as masked batched matmuls over each sequence's
    blocks gathered up to a shared length: any device and dtype, batch-invariant through
    exact-zero masking."""

    def __init__(self, cache: KVCache, cfg: ModelConfig) -> None:
        self.cache = cache
        self.scale = cfg.head_dim**-0.5
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.length = 0
        self._tables = self._bias = self._rows = torch.empty(0)

    def prepare(self, tables: list[list[int]], positions: list[int], positions_t: Tensor) -> None:
        cache, device = self.cache, positions_t.device
        self._rows = cache.prepare_rows(tables, positions)
        self.length = length = min(
            cache.max_seq_len, -(-(max(positions) + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK
        )
        self._tables = table_tensor(tables, -(-length // cache.block_size), device)
        # Positions past each sequence's own length are masked to exact zeros.
        visible = torch.arange(length, device=device) < (positions_t + 1)[:, None]
        dtype = cache.kv[0].dtype
        self._bias = torch.where(visible, 0.0, float("-inf")).to(dtype).view(len(tables), 1, 1, -1)

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, length, tables = self.cache, self.length, self._tables
        cache.write_rows(layer, k, v, self._rows)
        b = q.shape[0]
        query = (q * self.scale).view(b, self.num_kv_heads, self.group, self.head_dim)
        shape = (b, self.num_kv_heads, -1, self.head_dim)
        # [B, n, Hkv, bs, D] -> [B, Hkv, n * bs, D], cut to the shared length.
        keys = cache.keys[layer][tables].transpose(1, 2).reshape(shape)[:, :, :length]
        values = cache.values[layer][tables].transpose(1, 2).reshape(shape)[:, :, :length]
        scores = torch.matmul(query, keys.transpose(-1, -2)).add_(self._bias)
        out = torch.matmul(torch.softmax(scores, dim=-1), values)
        return out.view(b, -1, self.head_dim)
