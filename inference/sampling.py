"""Choosing the next token: greedy, or temperature / top-k / top-p sampling seeded per request."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def greedy(logits: Tensor) -> list[int]:
    """The highest-scoring token of each row (the lowest id among ties, as argmax does)."""
    return [int(i) for i in torch.argmax(logits, dim=-1).cpu().tolist()]


def sample(
    logits: Tensor,
    *,
    temperatures: Sequence[float],
    top_ks: Sequence[int | None],
    top_ps: Sequence[float | None],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row of `logits` [B, V], each row with its own settings and generator.

    Each row draws one uniform number from its own generator, so a request's tokens depend only
    on its seed and its logits, not on what shares its batch. The rows are filtered one at a
    time: sorting, masking and the cumulative sums make about ten vocabulary-sized temporaries
    (int64 ones among them), ~190 MiB for 32 rows of a 128k vocabulary at once, which the
    server's peak resident memory would carry; one row at a time it is ~6 MiB, for the same
    work (measured, inference/README.md).
    """
    if not len(logits) == len(temperatures) == len(top_ks) == len(top_ps) == len(generators):
        raise ValueError("sample: one temperature, top_k, top_p and generator per row of logits")
    rows = logits.float().cpu()
    return [
        _sample_row(rows[i], temperatures[i], top_ks[i], top_ps[i], generators[i])
        for i in range(rows.shape[0])
    ]


def _sample_row(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> int:
    """One token from `logits` [V] (on the CPU, where the generators are)."""
    vocab = logits.shape[-1]
    # A float32 divisor, as a tensor: the same division, bit for bit, as rows divided together.
    ordered, order = torch.sort(logits / torch.tensor([temperature]), descending=True)
    if top_k is not None and top_k < vocab:
        ordered[max(0, top_k) :] = float("-inf")
    probs = torch.softmax(ordered, dim=-1)
    del ordered
    # Keep the smallest prefix whose mass reaches p: a token stays if the mass before it is < p
    # (so the first token always stays). Without top_p, p = 1 (rounding may drop a tail).
    before = torch.cumsum(probs, dim=-1).sub_(probs)
    probs.masked_fill_(before >= (1.0 if top_p is None else top_p), 0.0)
    del before
    cdf = torch.cumsum(probs, dim=-1)
    draw = float(torch.rand(1, generator=generator))
    # The first position whose cumulative mass exceeds the draw (scaled to the kept mass).
    scaled = torch.tensor([draw], dtype=torch.float32) * cdf[-1:]
    index = int(torch.searchsorted(cdf, scaled, right=True).clamp_(max=vocab - 1))
    # Rounding can land on a dropped position past the kept prefix: step back onto kept mass.
    kept = int((probs > 0).sum()) - 1
    return int(order[min(index, kept)])
