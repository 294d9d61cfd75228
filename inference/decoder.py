"""Serving's load-time choices over one model: a paged KV cache, prefill, batch-invariant decode.

`Decoder` takes training's `LlamaModel` and runs its blocks (`LlamaModel.hidden`) in two kinds of
pass, each a `Run` built once here: prefill (`dense_linear`, `CachedPrefill`) and decode (the
projections and attention backend chosen below). Both use the in-place forms of the fused ops,
so the logits match the training model's to float tolerance.

Batch invariance: a sequence's logits must not depend on which other sequences share its decode
step (greedy output identical alone and among 32 requests). What is chosen for decode:

- Projections (`modeling.linear`): on CPU in float32 with the kiln kernels built, `PanelLinear`
  (kiln's `panel_linear`, one fixed summation order per output whatever the row count): any batch
  runs at its own size, a lone sequence at one row. Elsewhere (no extension, a GPU) `RowLinear`,
  padded to a few row counts (2, 8, 32, ...) on MKL's packed GEMM on CPU. `check_invariance`
  verifies at load time that a row's result does not depend on its position, its neighbours or
  the row count, and where it does, moves to padded row counts, then raises the smallest (4, 8,
  ...) until it does not; at worst (a GPU, another BLAS) every step runs at one fixed row count.
- Attention (`modeling.attention`): with the CPU kernels (float32) or the CUDA kernels (any
  dtype), `KernelDecodeAttention` (kiln's `paged_decode_attention`: each sequence over its own
  blocks and length); elsewhere `PaddedDecodeAttention` (blocks gathered to a shared length,
  exact-zero masks). The
  invariance tests cover both.

The KV cache is `blocks` blocks of `block_size` positions; a sequence names its blocks in a block
table (a list of block ids), which the engine's block manager (`inference.blocks`) hands out.
Where a caller passes a slot number instead of a table, it means the fixed table of that slot:
blocks [slot * n, (slot + 1) * n), n = max_seq_len / block_size (tests and benchmarks that drive
the decoder directly, as the cache was before paging).

Prefill (one sequence at a time, its own shapes) needs no such care and uses the fastest kernels.

With `graphs=True` a decode step runs through fixed buffers padded to a batch-size bucket
(`inference.graphs`), captured as one CUDA graph per bucket on a GPU (`capture_graphs`); the
cache then has one block more than asked, the scratch block padded rows write to. It needs the
paged attention kernel (the padded backend's shapes change with the step's lengths).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import Tensor, nn

from inference.graphs import DecodeGraphs, StepBuffers
from modeling.attention import (
    ATTENTION_BLOCK,
    CachedPrefill,
    KernelDecodeAttention,
    KVCache,
    PaddedDecodeAttention,
)
from modeling.config import ModelConfig
from modeling.linear import (
    DecodeLinear,
    DecodeLinears,
    PanelLinear,
    RowLinear,
    dense_linear,
    row_buckets,
)
from modeling.model import Block, InPlaceOps, LlamaModel, Run, load_ops
from modeling.served import PackedWeight

__all__ = ["ATTENTION_BLOCK", "Decoder", "PanelLinear", "RowLinear", "row_buckets"]

log = logging.getLogger(__name__)


Table = int | list[int]  # a block table, or a slot number meaning its fixed table


def _role(name: str) -> str:
    """A module's name without its layer: "layers.3.attn.o_proj" -> "attn.o_proj"."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return ".".join(parts[2:])
    return name


class Decoder:
    """Prefill and batched decode of up to `slots` sequences over a paged KV cache of `blocks`
    blocks (default: room for `slots` sequences of max_seq_len).

    It takes the model over: moves it to `device` and `dtype` in place and freezes it.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        buckets: list[int] | None = None,
        blocks: int | None = None,
        block_size: int = 16,
        packed: dict[nn.Module, PackedWeight] | None = None,
        graphs: bool = False,
        graph_buckets: list[int] | None = None,
    ) -> None:
        cfg: ModelConfig = model.config
        # Served weights (`modeling.served`): every matrix packed, float32, bfloat16 or int8,
        # and computed by panel_linear in prefill and decode alike (no second copy).
        self.packed = packed
        self.config = cfg
        self.device, self.dtype = device, dtype
        self.slots = slots
        self.ops: Any = load_ops("kiln")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.rope = model.rope.contiguous()
        self._blocks = [block.forward for block in cast(list[Block], list(model.layers))]
        self.block_size = block_size
        self.blocks_per_seq = -(-cfg.max_seq_len // block_size)
        if blocks is None:
            blocks = slots * self.blocks_per_seq
        self.blocks = blocks  # the block ids a table may name: 0..blocks-1
        # Fixed-buffer decode pads a step with rows that write one block nobody holds.
        self.scratch_block: int | None = blocks if graphs else None
        cache_blocks = blocks + 1 if graphs else blocks
        self.cache = KVCache(
            cfg, blocks=cache_blocks, block_size=block_size, device=device, dtype=dtype
        )
        embed = None if packed is None else packed[model.embed_tokens].rows
        self._ops = InPlaceOps(model, rows=slots, embed_rows=embed)
        self._prefill = CachedPrefill(self.cache, cfg)
        kernels = (
            buckets is None
            and device.type == "cpu"
            and dtype == torch.float32
            and self.ops.HAVE_CPU_DECODE_OPS
        )
        if packed is not None and not kernels:
            raise ValueError(
                "packed weights need kiln's CPU kernels, float32 activations and no padded rows"
            )
        # kiln's paged_decode_attention and panel_linear: each sequence on its own,
        # batch-invariant. On a GPU the attention kernel too (with the CUDA kernels built).
        gpu_kernel = device.type == "cuda" and bool(getattr(self.ops, "HAVE_CUDA_KERNELS", False))
        self.attention_kernel = kernels or gpu_kernel
        self._decode: KernelDecodeAttention | PaddedDecodeAttention = (
            KernelDecodeAttention(self.cache, cfg, self.ops, slots)
            if self.attention_kernel
            else PaddedDecodeAttention(self.cache, cfg)
        )
        self.graphs: DecodeGraphs | None = None
        self._build_decode_linears(None if kernels else (buckets or row_buckets(slots)))
        self._prefill_linear: Any = dense_linear if packed is None else self.decode_linears
        if graphs:
            if not isinstance(self._decode, KernelDecodeAttention):
                raise ValueError(
                    "fixed-buffer decode (CUDA graphs) needs kiln's paged attention kernel: "
                    f"the kernels are not built for {device.type} {dtype}"
                )
            self.graphs = DecodeGraphs(
                self._decode_fixed,
                max_rows=slots,
                width=self.blocks_per_seq,
                block_size=block_size,
                max_seq_len=cfg.max_seq_len,
                scratch_block=blocks,
                rows_per_seq=2 * cfg.num_kv_heads,
                device=device,
                buckets=graph_buckets,
            )

    def _build_decode_linears(self, buckets: list[int] | None) -> None:
        """Padded RowLinears at `buckets`, or PanelLinears (no padding) for None."""
        self.buckets = [] if buckets is None else buckets
        if self.graphs is not None:
            self.graphs.graphs.clear()  # they call the projections being replaced
        head = self.model.head
        # One output buffer per projection role ("attn.qkv_proj", ...), shared by the layers: a
        # layer's projection output is consumed (normed into the residual stream, or attended)
        # before the next layer's same projection writes. One per module instead was 16 x 32
        # rows of q/k/v, o, gate/up and down outputs for Llama-3.2-1B: 46 MiB resident.
        roles = {m: _role(name) for name, m in self.model.named_modules()}
        shared: dict[tuple[str, int], Tensor] = {}

        def out_buffer(module: nn.Module, out_features: int) -> Tensor:
            key = (roles.get(module, str(id(module))), out_features)
            if key not in shared:
                shared[key] = torch.empty(self.slots, out_features, device=self.device)
            return shared[key]

        def make(module: nn.Module) -> DecodeLinear:
            bias = getattr(module, "bias", None)
            # The head's logits are returned, so they get a new tensor each step.
            reuse = module is not head
            if self.packed is not None:
                w = self.packed[module]
                return PanelLinear.from_panels(
                    w.panels,
                    w.scale,
                    w.out_features,
                    self.slots,
                    reuse_output=reuse,
                    bias=bias,
                    sums=w.sums,
                    in_features=w.in_features,
                    out=out_buffer(module, w.out_features) if reuse else None,
                )
            weight = cast(Tensor, module.weight).detach().contiguous()
            if buckets is None:
                out = out_buffer(module, weight.shape[0]) if reuse else None
                return PanelLinear(
                    weight, self.slots, self.ops, reuse_output=reuse, bias=bias, out=out
                )
            return RowLinear(weight, buckets, bias)

        modules: list[nn.Module] = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if head not in modules:
            modules.append(head)
        self.decode_linears = DecodeLinears(modules, make)

    @property
    def head_rows(self) -> DecodeLinear:
        """The decode implementation of the vocabulary projection."""
        return self.decode_linears.by_module[self.model.head]

    def check_invariance(self) -> bool:
        """Whether decode projections give a row the same result in any batch. Where the padded
        row counts sum differently (the small ones, on some CPUs), drops the smallest until the
        rest agree, down to one row count for every step."""
        while not self.decode_linears.check_invariance():
            if self.packed is not None:
                return False  # packed weights have no padded fallback
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
        return self.cache.nbytes()

    def weight_bytes(self) -> int:
        """Bytes of the weights as served (packed matrices, or the model's parameters)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.packed is None:
            return params
        return params + sum(w.nbytes() for w in self.packed.values())

    def table(self, table: Table) -> list[int]:
        """A block table as given, or the fixed table of a slot number."""
        if isinstance(table, int):
            n = self.blocks_per_seq
            if (table + 1) * n > self.blocks:
                raise ValueError(f"slot {table} is past the cache's {self.blocks} blocks")
            return list(range(table * n, (table + 1) * n))
        return table

    def prefill(self, table: Table, token_ids: Tensor, start: int = 0) -> Tensor:
        """Runs `token_ids` [T] at positions start.. into the blocks of `table` (which must
        cover them); returns the last logits [V]."""
        positions = torch.arange(start, start + token_ids.shape[0], device=self.device)
        self._prefill.prepare(self.table(table), start, positions)
        run = Run(positions, self.rope, self._ops, self._prefill_linear, self._prefill)
        x = self.model.hidden(token_ids.to(self.device), run, self._blocks)
        return self._prefill_linear(self.model.head, x[-1:])[0].float()

    def decode(self, tables: list[Table], positions: list[int], token_ids: list[int]) -> Tensor:
        """One step for B sequences: token_ids [B] at positions [B] into the blocks of tables
        [B] -> logits [B, V]. A row's result does not depend on the other rows."""
        if self.graphs is not None:
            return self.graphs.step([self.table(t) for t in tables], positions, token_ids)
        return self.decode_eager(tables, positions, token_ids)

    def decode_eager(
        self, tables: list[Table], positions: list[int], token_ids: list[int]
    ) -> Tensor:
        """`decode` at the step's own batch size, its inputs built for this step."""
        positions_t = torch.tensor(positions, device=self.device)
        self._decode.prepare([self.table(t) for t in tables], positions, positions_t)
        linears = self.decode_linears
        run = Run(positions_t, self.rope, self._ops, linears, self._decode)
        x = self.model.hidden(torch.tensor(token_ids, device=self.device), run, self._blocks)
        return linears(self.model.head, x).float()

    def _decode_fixed(self, buf: StepBuffers) -> Tensor:
        """A decode step over fixed buffers (`inference.graphs`): the lengths and cache rows are
        computed on the device, so a CUDA graph captures the whole step."""
        torch.add(buf.positions, 1, out=buf.lengths)
        self.cache.rows_into(buf.tables, buf.positions, buf.rows)
        attention = cast(KernelDecodeAttention, self._decode)
        attention.bind(buf.tables, buf.lengths, buf.rows)
        linears = self.decode_linears
        run = Run(buf.positions, self.rope, self._ops, linears, attention)
        x = self.model.hidden(buf.tokens, run, self._blocks)
        return linears(self.model.head, x).float()

    def capture_graphs(self) -> bool:
        """Captures each bucket's decode step as a CUDA graph (after `check_invariance`, which
        may replace the projections); False where there is nothing to capture (no fixed-buffer
        decode, or not on CUDA: steps then run the same buffers eagerly)."""
        if self.graphs is None or self.device.type != "cuda":
            return False
        self.graphs.capture()
        return True
