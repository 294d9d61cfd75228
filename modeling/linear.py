"""Projection implementations: how a pass computes `x @ weight.T` for the model's linear layers.

The modules hold the weights (`nn.Linear`, and the embedding when the head is tied); a pass
computes each projection through `Run.linear(module, x)`:

- `dense_linear`: `F.linear` on the module's weight (training, prefill).
- `DecodeLinears`: an implementation per module chosen once at load (decode), either kiln's
  `panel_linear` (`PanelLinear`, batch-invariant by construction) or a GEMM padded to a few fixed
  row counts (`RowLinear`). `inference.decoder` chooses between them.

Batch invariance: a decode row's result must not depend on the other rows of its step. A GEMM's
kernel (and so its summation order) changes with the row count: MKL's plain sgemm sums one row,
2-10 rows and more rows three different ways; MKL's packed GEMM sums every row count from 2 up
one way on Intel Xeons, and 2-3 rows one way and 4 and more another on AMD EPYC. `panel_linear`
sums every output as one chain of multiply-adds over the inputs in order whatever the row count.
`check_invariance` probes an implementation on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dense_linear(module: nn.Module, x: Tensor) -> Tensor:
    """`x @ module.weight.T (+ module.bias)` with the fastest GEMM for the shape (training,
    prefill). The head may be the embedding, which has no bias."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    return F.linear(x, weight, getattr(module, "bias", None))


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

    def __init__(self, weight: Tensor, buckets: list[int], bias: Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
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
        out: Tensor
        if packed is not None:
            out = self._mkl_linear(padded, packed, self.weight, self.bias, rows)  # type: ignore[misc]
        else:
            out = F.linear(padded, self.weight, self.bias)
        return out if rows == b else out[:b]

    def check_invariance(self) -> bool:
        """Whether a row's result is bitwise the same at every row count, position and company."""
        return _same_in_any_batch(self, self.weight, self.buckets)


class PanelLinear:
    """`x [B, K] @ weight.T` for decode through kiln's `panel_linear` (CPU, float32 activations;
    float32, bfloat16 or weight-only int8 weights) or, for int8 weights packed with their row
    sums, `w8a8_linear` (activations quantized per row, integer products): batch-invariant by
    construction at any row count, so nothing is padded. Served weights (`modeling.served`)
    come packed: `from_panels`."""

    def __init__(
        self,
        weight: Tensor,
        max_rows: int,
        ops: Any,
        *,
        reuse_output: bool,
        bias: Tensor | None = None,
        out: Tensor | None = None,
    ) -> None:
        panels = ops.pack_panels(weight)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        self._setup(panels, None, None, shape, max_rows, reuse_output, bias, out)

    @classmethod
    def from_panels(
        cls,
        panels: Tensor,
        scale: Tensor | None,
        out_features: int,
        max_rows: int,
        *,
        reuse_output: bool,
        bias: Tensor | None = None,
        sums: Tensor | None = None,
        in_features: int | None = None,
        out: Tensor | None = None,
    ) -> PanelLinear:
        """Over weights already packed: `kernels.reference.pack_panels` (int8 weight-only with
        `scale`), or `pack_int8_panels` with `sums`, `scale` and `in_features` (W8A8)."""
        self = cls.__new__(cls)
        k = int(panels.shape[1]) if in_features is None else in_features
        self._setup(panels, scale, sums, (out_features, k), max_rows, reuse_output, bias, out)
        return self

    def _setup(
        self,
        panels: Tensor,
        scale: Tensor | None,
        sums: Tensor | None,
        shape: tuple[int, int],
        max_rows: int,
        reuse_output: bool,
        bias: Tensor | None,
        out: Tensor | None = None,
    ) -> None:
        self.bias = bias
        self.buckets: list[int] = []  # no padded row counts
        self.out_features, self.in_features = shape
        self.panels, self.scale, self.sums = panels, scale, sums
        self.max_rows = max_rows
        # With reuse_output a call returns a view of one buffer that the next call overwrites
        # (the projections inside a step); without, a new tensor (the logits a step returns).
        # `out` [max_rows, out_features]: that buffer given, shared with other projections whose
        # output is consumed before this one writes (the same projection in every layer).
        if out is not None and (not reuse_output or tuple(out.shape) != (max_rows, shape[0])):
            raise ValueError(
                f"out must be a [{max_rows}, {shape[0]}] buffer, with reuse_output, "
                f"got {tuple(out.shape)}"
            )
        if not reuse_output:
            self._out = None
        else:
            self._out = torch.empty(max_rows, shape[0]) if out is None else out
        # The call's arguments after x (and before out), fixed at load: one op call per step.
        self._args: tuple[Any, ...]
        if sums is not None:
            if scale is None:
                raise ValueError("W8A8 panels need the weight's scale")
            self._op = torch.ops.kiln.w8a8_linear.default
            self._op_out = torch.ops.kiln.w8a8_linear_out.default
            self._args = (panels, sums, scale, self.out_features)
            self._scale_after_out = False
        else:
            self._op = torch.ops.kiln.panel_linear.default
            self._op_out = torch.ops.kiln.panel_linear_out.default
            self._args = (panels, self.out_features)
            self._scale_after_out = True

    def __call__(self, x: Tensor) -> Tensor:
        if self._scale_after_out:  # panel_linear: (x, panels, n, [out,] scale)
            if self._out is None or x.shape[0] > self.max_rows:
                out: Tensor = self._op(x, *self._args, self.scale)
            else:
                out = self._out[: x.shape[0]]
                self._op_out(x, *self._args, out, self.scale)
        elif self._out is None or x.shape[0] > self.max_rows:
            out = self._op(x, *self._args)
        else:
            out = self._out[: x.shape[0]]
            self._op_out(x, *self._args, out)
        # Added per element after the fixed-order sums: still batch-invariant.
        return out if self.bias is None else out.add_(self.bias)

    def check_invariance(self) -> bool:
        """Whether a row's result is bitwise the same at every row count, position and company."""
        rows = sorted({1, 2, 3, 5, 8, 13, self.max_rows} & set(range(1, self.max_rows + 1)))
        return _same_in_any_batch(self, torch.empty(0, self.in_features), rows)


def _same_in_any_batch(linear: Any, weight: Tensor, row_counts: list[int]) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = weight.shape[1]
    like = weight if weight.is_floating_point() else weight.float()
    probe = torch.randn(1, k, generator=gen).to(like)
    alone = linear(probe)[0].clone()  # the next call may reuse the output's buffer
    for trial, rows in enumerate(row_counts + row_counts):
        batch = torch.randn(rows, k, generator=gen).to(like)
        position = (trial * 7919) % rows
        batch[position] = probe[0]
        if not torch.equal(linear(batch)[position], alone):
            return False
    return True


DecodeLinear = RowLinear | PanelLinear


class DecodeLinears:
    """Decode's projection implementations, one per weight-holding module, built once at load:
    `self(module, x)` is `Run.linear` for decode steps."""

    def __init__(
        self,
        modules: Iterable[nn.Module],
        make: Callable[[nn.Module], DecodeLinear],
    ) -> None:
        self.by_module: dict[nn.Module, DecodeLinear] = {m: make(m) for m in modules}

    def __call__(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.by_module[module](x)

    def check_invariance(self) -> bool:
        """Whether every projection gives a row the same result in any batch."""
        return all(linear.check_invariance() for linear in self.by_module.values())
