"""Decode steps through fixed buffers, one CUDA graph per batch-size bucket.

A decode step launches a few hundred small kernels (five projections, two norms, rotary and
attention per layer); at batch sizes a GPU decodes at, launching them from Python costs more
than running them. A CUDA graph records the step's launches once and replays them with one
call, which only works if every replay reads and writes the same memory, with the same shapes,
and nothing in the step reads back to the host. So the step's inputs live in buffers allocated
once, sized for the largest batch:

- token ids [R], positions [R], block tables [R, W] (W = blocks of a full-length sequence, so a
  table never outgrows its row), lengths [R] and the cache rows this step's k and v go to
  [R * 2 * kv_heads], both computed on the device from the positions and tables;
- a step of B sequences runs at the smallest bucket n >= B (1, 2, 4, 8, then multiples of 8, up
  to R, as vLLM does), through the first n rows of each buffer; rows B..n are padding: token 0
  at position 0, every table entry the scratch block, a cache block that no sequence holds (the
  decoder allocates one past the block manager's). A padded row's k and v go there, never to a
  real block, and its logits are dropped;
- each bucket's step is captured once at load (`capture`), largest first, in one memory pool
  shared by all of them (a smaller step's temporaries fit in the memory the largest one used),
  after an eager run of each on a side stream (cuBLAS and the allocator initialise outside
  capture). A step then copies its inputs into the buffers and replays its bucket's graph.

Padding changes no real row's result: every op of a decode step computes each row on its own
(`inference.decoder` chooses batch-invariant projections and attention), so a padded step's
logits equal the unpadded step's bitwise. The attention kernel reads a sequence's table only up
to its own length, so the table's width does not change its sums either.

The same code runs on CPU without capture (each step runs the bucket's forward eagerly): that is
how the padding and the buffers are tested without a GPU. Serving on CPU does not use it by
default: `panel_linear` runs any batch at its own size, and padding would only add work.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


# Shared memory a thread block may opt into, by compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"), where torch does not report it.
SHARED_MEMORY_OPTIN = {(7, 0): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
                       (9, 0): 227, (10, 0): 227, (12, 0): 99}  # fmt: skip


def attention_shared_bytes(max_seq_len: int, block_size: int) -> int:
    """Shared memory of kiln's CUDA paged attention kernel at a full-length table: it holds a
    score per position of the table's capacity (float32, for float32 and 16-bit caches) and 32
    values for its reductions (`kernels/csrc/cuda/kernels.cu`)."""
    capacity = -(-max_seq_len // block_size) * block_size
    return (capacity + 32) * 4


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one thread block may use on `device` (opted in)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return SHARED_MEMORY_OPTIN.get((props.major, props.minor), 48) * 1024


def batch_buckets(max_rows: int) -> list[int]:
    """The batch sizes a decode step is padded to: 1, 2, 4, 8, then every multiple of 8 below
    `max_rows` up to 256, of 16 past it, and `max_rows` itself (1, 2, 4, 8, 16, 24, 32 for 32):
    at most 8 or 16 rows of padding, and few graphs to capture."""
    if max_rows < 1:
        raise ValueError(f"need at least one row, got {max_rows}")
    small = [r for r in (1, 2, 4) if r < max_rows]
    eights = range(8, min(max_rows, 256), 8)
    sixteens = range(256, max_rows, 16)
    return [*small, *eights, *sixteens, max_rows]


def bucket_for(buckets: list[int], rows: int) -> int:
    """The smallest bucket holding `rows` rows (buckets ascending)."""
    i = bisect.bisect_left(buckets, rows)
    if rows < 1 or i == len(buckets):
        raise ValueError(f"a decode step of {rows} rows: the buckets hold 1 to {buckets[-1]}")
    return buckets[i]


@dataclass(frozen=True, slots=True)
class StepBuffers:
    """The first n rows of each fixed buffer: what a bucket's forward reads and writes."""

    tokens: Tensor  # [n] int64
    positions: Tensor  # [n] int64
    tables: Tensor  # [n, W] int64
    lengths: Tensor  # [n] int64, positions + 1 (the forward computes it)
    rows: Tensor  # [n * rows_per_seq] int64, the cache rows of k and v (the forward computes it)


class DecodeGraphs:
    """Fixed input buffers for up to `max_rows` sequences and, on CUDA, a graph per bucket.

    `forward(buffers)` is the decode step over a bucket's buffers returning its logits [n, V];
    it must allocate nothing whose size depends on the inputs' values and read nothing back.
    """

    def __init__(
        self,
        forward: Callable[[StepBuffers], Tensor],
        *,
        max_rows: int,
        width: int,
        block_size: int,
        max_seq_len: int,
        scratch_block: int,
        rows_per_seq: int,
        device: torch.device,
        buckets: list[int] | None = None,
    ) -> None:
        self.forward = forward
        self.buckets = sorted(buckets) if buckets is not None else batch_buckets(max_rows)
        if self.buckets[-1] > max_rows:
            raise ValueError(f"bucket {self.buckets[-1]} is larger than the {max_rows} rows held")
        self.max_rows, self.width, self.block_size = max_rows, width, block_size
        self.max_seq_len, self.scratch_block = max_seq_len, scratch_block
        self.rows_per_seq = rows_per_seq
        self.device = device
        on_gpu = device.type == "cuda"

        def buffer(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.tokens, self.positions = buffer(max_rows), buffer(max_rows)
        self.lengths = buffer(max_rows)
        self.tables = torch.full((max_rows, width), scratch_block, dtype=torch.long, device=device)
        self.rows = buffer(max_rows * rows_per_seq)
        # The host side of each step's copy: pinned on a GPU, so the copies are asynchronous
        # DMA; `_copied` says when the last one finished and the host may write again.
        host = torch.zeros(max_rows * (2 + width), dtype=torch.long, pin_memory=on_gpu)
        self._host = host
        self._host_tokens = host[:max_rows]
        self._host_positions = host[max_rows : 2 * max_rows]
        self._host_tables = host[2 * max_rows :].view(max_rows, width)
        self._np_tokens = self._host_tokens.numpy()
        self._np_positions = self._host_positions.numpy()
        self._np_tables = self._host_tables.numpy()
        self._copied: torch.cuda.Event | None = None
        # bucket -> (its graph, the logits tensor its replay writes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._views = {n: self._slice(n) for n in self.buckets}

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _slice(self, n: int) -> StepBuffers:
        return StepBuffers(
            self.tokens[:n],
            self.positions[:n],
            self.tables[:n],
            self.lengths[:n],
            self.rows[: n * self.rows_per_seq],
        )

    def views(self, n: int) -> StepBuffers:
        return self._views[n]

    # -- a step ----------------------------------------------------------------------------------

    def load(self, tables: list[list[int]], positions: list[int], token_ids: list[int]) -> int:
        """Copies a step's inputs into the buffers, padded to their bucket; returns the bucket.
        Checked on the host first: inside a graph a bad position or table gives NaN, not an
        error."""
        b = len(tables)
        if not b == len(positions) == len(token_ids):
            raise ValueError(
                f"a decode step needs one table, position and token per sequence, got "
                f"{b}, {len(positions)} and {len(token_ids)}"
            )
        n = bucket_for(self.buckets, b)
        bs = self.block_size
        for row, (table, position) in enumerate(zip(tables, positions, strict=True)):
            if not 0 <= position < self.max_seq_len:
                raise ValueError(
                    f"row {row}: position {position} is outside the context (0 to "
                    f"{self.max_seq_len - 1})"
                )
            if len(table) <= position // bs:
                raise ValueError(
                    f"row {row}: a table of {len(table)} blocks does not cover position {position}"
                )
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        self._np_tokens[:b] = token_ids
        self._np_tokens[b:n] = 0
        self._np_positions[:b] = positions
        self._np_positions[b:n] = 0
        tab = self._np_tables
        tab[:n] = self.scratch_block
        width = self.width
        for row, table in enumerate(tables):
            entries = table[:width]
            tab[row, : len(entries)] = np.asarray(entries, dtype=np.int64)
        gpu = self.device.type == "cuda"
        self.tokens[:n].copy_(self._host_tokens[:n], non_blocking=gpu)
        self.positions[:n].copy_(self._host_positions[:n], non_blocking=gpu)
        self.tables[:n].copy_(self._host_tables[:n], non_blocking=gpu)
        if gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self.device))
            self._copied = event
        return n

    def run(self, n: int) -> Tensor:
        """Bucket n's step over the buffers as loaded: its graph replayed, else run eagerly.
        The logits [n, V] are the graph's own output, overwritten by the next replay."""
        captured = self.graphs.get(n)
        if captured is None:
            return self.forward(self._views[n])
        graph, logits = captured
        graph.replay()
        return logits

    def step(self, tables: list[list[int]], positions: list[int], token_ids: list[int]) -> Tensor:
        """One decode step of B sequences -> their logits [B, V] (a tensor of their own)."""
        n = self.load(tables, positions, token_ids)
        return self.run(n)[: len(tables)].clone()

    # -- capture ---------------------------------------------------------------------------------

    def pad_all(self) -> None:
        """Every row padding: what capture and warm-up run on (writing the scratch block only)."""
        self.tokens.zero_()
        self.positions.zero_()
        self.tables.fill_(self.scratch_block)

    def capture(self) -> None:
        """Captures each bucket's step as a CUDA graph (CUDA only)."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.graphs.clear()
        self.pad_all()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # Lazy initialisation (cuBLAS handles and workspaces, the allocator's blocks, the
            # attention kernel's shared-memory opt-in) happens here, not during capture.
            for n in self.buckets:
                self.forward(self._views[n])
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.buckets):  # largest first: the others reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(self._views[n])
            self.graphs[n] = (graph, logits)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)
