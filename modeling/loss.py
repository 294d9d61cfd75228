"""Next-token cross entropy fused with the output projection, computed a chunk of tokens at a time.

At real vocabularies (32k-152k) the logits of a batch are the largest tensor of a training step:
[tokens, vocab] in the compute dtype, again in float32 for the loss, and once more as their
gradient. `linear_cross_entropy` never holds them whole (the technique of Liger-Kernel's fused
linear cross entropy): per chunk of tokens it computes the chunk's logits, its loss, the gradient
of the logits (softmax minus the one-hot target) and from it, still in the forward pass, the
chunk's share of the gradients of the hidden states and of the projection weight. Backward only
scales those by the incoming gradient. Tokens whose target is `IGNORE_INDEX` (prompt tokens,
padding) are left out before the projection: they cost nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Logits held per chunk, at most, in elements (128 MiB in float32; with their log-softmax and
# bf16 gradient ~320 MiB). Each chunk adds its part to the whole [vocab, hidden] weight gradient,
# a pass over it: chunks of several hundred tokens keep those passes few and the GEMMs efficient.
CHUNK_ELEMENTS = 1 << 25


def chunk_rows(tokens: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: at most `elements` logits (and at least 16 rows), the chunks of equal
    size (1000 tokens of a 49152 vocabulary in two chunks of 500, not 682 and 318)."""
    most = max(16, elements // vocab)
    chunks = -(-tokens // most)
    return max(1, -(-tokens // chunks))


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's where it is on (as F.linear would run), else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class TiedGradient:
    """The tied embedding/head weight's gradient, handed from the fused loss to the embedding.

    With tied weights the head's gradient (from the fused loss, computed in its forward) and the
    embedding's (rows of the first layer's input gradient) are two gradients of one [V, H]
    weight: as autograd would compute them, a second dense [V, H] tensor for the embedding's and
    then their sum. Instead the loss's backward leaves its float32 gradient here, and the
    embedding's backward (`tied_embedding`, which runs last: the embedding starts the graph)
    adds its rows into that one tensor with `index_add_` and hands it to autograd as the
    weight's gradient, so DDP and FSDP see one gradient arrive, once, whole.
    """

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _LinearCrossEntropy(torch.autograd.Function):
    """`scale` * the sum over rows of cross_entropy(hidden @ weight.T + bias, targets), rows all
    targets (the caller drops ignored ones); the gradients are computed in the forward pass.

    The mean's 1 / count is `scale`, applied inside: the gradients come out final, and backward
    (whose incoming gradient is then usually 1) makes no pass over the [V, H] weight gradient.
    With `tied`, the weight's gradient goes to `tied.grad` instead (see `TiedGradient`).
    Backward scales the saved gradients in place: a graph kept with `retain_graph` cannot be
    run backward a second time (autograd refuses: a saved tensor was modified).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        dtype: torch.dtype,
        rows: int,
        scale: float,
        tied: TiedGradient | None,
    ) -> Tensor:
        n = hidden.shape[0]
        h_all = hidden.to(dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h_all) if want_h else None
        # float32 sums over the chunks, whatever the GEMM dtype; the first chunk writes it.
        grad_w = (
            torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )
        grad_b: Tensor | None = None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for first, start in enumerate(range(0, n, rows)):
            h = h_all[start : start + rows]
            # Scaled on the [rows, H] side of the GEMMs, not on the [rows, V] logits.
            h_scaled = h * scale if scale != 1.0 else h
            t = targets[start : start + rows].unsqueeze(1)
            # float32 for the softmax (bf16 logits would round the loss), log-softmax in place.
            logits = F.linear(h, w, b).float()
            logp = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
            loss -= logp.gather(1, t).sum()
            # d(sum of losses)/d(logits) = softmax(logits) - one_hot(target), in place.
            grad = logp.exp_().scatter_add_(1, t, logp.new_full(t.shape, -1.0))
            if want_b:
                part_b = grad.sum(0).mul_(scale)
                grad_b = part_b if grad_b is None else grad_b.add_(part_b)
            g = grad.to(dtype)
            del logits, logp, grad  # the chunk's float32 logits go before the GEMMs
            if grad_h is not None:
                out = grad_h[start : start + rows]
                torch.mm(g, w, out=out)
                if scale != 1.0:
                    out.mul_(scale)
            if grad_w is not None:
                _add_weight_grad(grad_w, g, h_scaled, first == 0)
            del g
        ctx.tied = tied
        if tied is not None and grad_w is not None:
            tied.grad, grad_w = grad_w, None
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # The loss is usually the graph's output (grad_out 1): no pass over [V, H] then.
        one = bool(grad_out == 1)
        tied: TiedGradient | None = ctx.tied
        if tied is not None and tied.grad is not None and not one:
            tied.grad.mul_(grad_out)  # gradient accumulation's 1 / micro-batches
        saved = iter(ctx.saved_tensors)
        grads: list[Tensor | None] = []
        for present, dtype in zip(ctx.present, ctx.dtypes, strict=True):
            if not present:
                grads.append(None)
                continue
            g = next(saved)
            if not one:
                g = g.mul_(grad_out)
            grads.append(g.to(dtype))
        return (*grads, None, None, None, None, None)


# Rows of the [V, H] weight gradient per GEMM: a low-precision GEMM's output is added to the
# float32 sum a block at a time, so its temporaries (and add_'s float32 copy of it) are
# 2^24 elements, not another [V, H].
WEIGHT_GRAD_BLOCK = 1 << 24


def _add_weight_grad(grad_w: Tensor, g: Tensor, h: Tensor, first: bool) -> None:
    """grad_w (+)= g.T @ h: g [rows, V], h [rows, H], grad_w [V, H] float32."""
    if g.dtype == torch.float32:  # straight into the sum, no temporary
        if first:
            torch.mm(g.t(), h, out=grad_w)
        else:
            grad_w.addmm_(g.t(), h)
        return
    vocab, width = grad_w.shape
    block = max(1, WEIGHT_GRAD_BLOCK // width)
    buf = g.new_empty(min(block, vocab), width)
    gt = g.t()
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        part = torch.mm(gt[v0:v1], h, out=buf[: v1 - v0])
        if first:
            grad_w[v0:v1].copy_(part)
        else:
            grad_w[v0:v1].add_(part)


class _TiedEmbedding(torch.autograd.Function):
    """weight[ids]; backward adds the rows' gradients into the fused loss's weight gradient
    (`TiedGradient`) and returns that one tensor as the weight's gradient."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, tied: TiedGradient) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.tied, ctx.shape, ctx.dtype = tied, weight.shape, weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        tied: TiedGradient = ctx.tied
        grad, tied.grad = tied.grad, None
        if grad is None:  # the loss was not differentiated (or had no targets): rows alone
            grad = grad_out.new_zeros(ctx.shape, dtype=torch.float32)
        rows = grad_out.reshape(-1, ctx.shape[1])
        grad.index_add_(0, ids.reshape(-1), rows.to(grad.dtype))
        return None, grad.to(ctx.dtype), None


@torch.compiler.disable  # a Python object carried from forward to backward: runs eagerly
def tied_embedding(ids: Tensor, weight: Tensor, tied: TiedGradient) -> Tensor:
    """F.embedding(ids, weight), whose weight gradient is `tied`'s (see `TiedGradient`): pass
    the same `tied` to `linear_cross_entropy` with the same weight as its head."""
    out: Tensor = _TiedEmbedding.apply(ids, weight, tied)
    return out


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    rows: int | None = None,
    tied: TiedGradient | None = None,
) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without materializing the logits.

    hidden [..., H], weight [V, H], targets [...] (`ignore_index` where there is none).
    `reduction` "mean" (over the targets; a batch with none gives 0, not NaN) or "sum".
    The result is float32. Gradients reach hidden, weight and bias as through `F.linear` and
    `F.cross_entropy`; under autocast the GEMMs run in autocast's dtype. `tied`: the weight is
    also an embedding's, looked up with `tied_embedding(ids, weight, tied)`, which receives
    this loss's weight gradient and returns the sum of both (one [V, H] tensor, not three).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"{t.shape[0]} targets for {h.shape[0]} hidden states")
    keep = t.ne(ignore_index)
    count = int(keep.sum())
    if count < t.shape[0]:  # only targeted tokens go through the projection
        index = keep.nonzero().squeeze(1)
        h, t = h.index_select(0, index), t.index_select(0, index)
    # A batch without targets (all prompt) gives 0, not NaN.
    scale = 1.0 if reduction == "sum" else 1.0 / max(count, 1)
    if h.shape[0] == 0:  # zero, with zero gradients, without a pass over the weight
        return (h.sum() + weight[:0].sum()) * 0.0
    rows = rows or chunk_rows(h.shape[0], weight.shape[0])
    return _fused(h, weight, bias, t, rows, scale, tied)


@torch.compiler.disable  # a Python loop over data-dependent chunks: runs eagerly inside a graph
def _fused(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    t: Tensor,
    rows: int,
    scale: float,
    tied: TiedGradient | None,
) -> Tensor:
    dtype = _compute_dtype(h)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, weight, bias)
    )
    if not needs_grad:  # evaluation: the loss alone, still a chunk at a time
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            logits = F.linear(h[start : start + rows].to(dtype), w, b).float()
            total += F.cross_entropy(logits, t[start : start + rows], reduction="sum")
        return total * scale
    with torch.autocast(h.device.type, enabled=False):
        out: Tensor = _LinearCrossEntropy.apply(h, weight, bias, t, dtype, rows, scale, tied)
    return out
