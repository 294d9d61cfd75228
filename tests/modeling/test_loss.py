"""The fused linear + cross entropy against F.linear then F.cross_entropy: loss and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from modeling.config import PRESETS
from modeling.loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy
from modeling.model import LlamaModel


def unfused(h, w, t, bias=None, reduction="mean"):  # type: ignore[no-untyped-def]
    logits = F.linear(h, w, bias).float()
    return F.cross_entropy(
        logits.view(-1, w.shape[0]), t.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def inputs(n: int, hidden: int, vocab: int, *, bias: bool = False, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.2).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (2, n), generator=g)
    return h, w, b, t


def grads(loss, *xs):  # type: ignore[no-untyped-def]
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


@pytest.mark.parametrize(
    ("n", "vocab", "rows", "bias", "masked"),
    [
        (37, 101, 16, False, False),  # chunks that do not divide the tokens
        (37, 101, 16, True, True),
        (5, 64, 16, False, True),  # fewer tokens than a chunk
        (64, 300, 1024, True, False),
    ],
)
def test_fp32_loss_and_gradients_equal_the_unfused_path(
    n: int, vocab: int, rows: int, bias: bool, masked: bool
) -> None:
    h, w, b, t = inputs(n, 24, vocab, bias=bias)
    if masked:  # prompt tokens and padding
        t[0, : n // 2] = IGNORE_INDEX
        t[1, -2:] = IGNORE_INDEX
    for reduction in ("mean", "sum"):
        ours = linear_cross_entropy(h, w, t, bias=b, rows=rows, reduction=reduction)
        theirs = unfused(h, w, t, b, reduction)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        for a, e in zip(grads(ours * 3.0, h, w, b), grads(theirs * 3.0, h, w, b), strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_matches_the_unfused_path_within_bf16_rounding() -> None:
    h, w, b, t = inputs(70, 64, 500, bias=True)
    t[0, :10] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, bias=b, rows=16)
        theirs = unfused(h, w, t, b)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)
    for a, e in zip(grads(ours, h, w, b), grads(theirs, h, w, b), strict=True):
        assert a.dtype == e.dtype == torch.float32  # gradients in the parameters' dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-4)


def test_a_batch_without_targets_gives_zero_and_zero_gradients() -> None:
    h, w, _, t = inputs(8, 16, 40)
    loss = linear_cross_entropy(h, w, torch.full_like(t, IGNORE_INDEX))
    assert loss.item() == 0.0
    gh, gw = grads(loss, h, w)
    assert gh.shape == h.shape and gw.shape == w.shape
    assert not gh.any() and not gw.any()


def test_without_gradients_it_computes_the_loss_alone() -> None:
    h, w, _, t = inputs(33, 16, 90)
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, t, rows=16)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, unfused(h, w, t).detach(), rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_weight_gradient() -> None:
    h, w, _, t = inputs(20, 16, 50)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, t, rows=16)
    (gh,) = grads(loss, h)
    torch.testing.assert_close(gh, grads(unfused(h, w, t), h)[0], rtol=1e-5, atol=1e-6)
    assert w.grad is None


def test_chunk_rows_bounds_the_logits_held_in_equal_chunks() -> None:
    assert chunk_rows(4096, 128256) == 256  # 16 chunks of at most 261 rows
    assert chunk_rows(1024, 49152) == 512  # 2 chunks of at most 682
    assert chunk_rows(100, 49152) == 100
    assert chunk_rows(40, 10**9) == 14  # at most 16 rows (the floor): 3 chunks


@pytest.mark.parametrize("tied", [True, False])
def test_the_models_fused_training_loss_equals_the_logits_loss(tied: bool) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], tie_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    targets = torch.randint(0, cfg.vocab_size, (2, 17))
    targets[1, :5] = IGNORE_INDEX
    fused = model(ids, targets=targets)
    fused.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    unfused_loss = F.cross_entropy(
        model(ids).view(-1, cfg.vocab_size), targets.view(-1), ignore_index=IGNORE_INDEX
    )
    unfused_loss.backward()
    torch.testing.assert_close(fused, unfused_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_model_runs_the_fused_loss_eagerly_between_graphs() -> None:
    """The fused loss is a graph break (`torch.compiler.disable`): the blocks compile around it
    (aot_eager here: dynamo and AOT autograd; the training benchmark runs inductor)."""
    torch._dynamo.reset()
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    results = []
    for fn in (torch.compile(model, backend="aot_eager"), model):
        model.zero_grad()
        loss = fn(ids, targets=ids)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
