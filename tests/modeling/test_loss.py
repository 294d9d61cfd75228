"""The fused linear + cross entropy against F.linear then F.cross_entropy: loss and gradients."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from modeling.config import PRESETS
from modeling.loss import (
    IGNORE_INDEX,
    TiedGradient,
    chunk_rows,
    linear_cross_entropy,
    tied_embedding,
)
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


# -- tied embedding and head: one weight gradient ------------------------------------------------


def tied_inputs(seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(97, 24, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, 97, (2, 19), generator=g)
    ids[1, 3:6] = ids[0, 0]  # a token met several times: its rows add up
    t = torch.randint(0, 97, (2, 19), generator=g)
    t[0, :4] = IGNORE_INDEX
    mix = torch.randn(24, 24, generator=g) * 0.3  # stands for the blocks between the two
    return w, ids, t, mix


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("rows", [7, 64])
def test_a_tied_weight_gets_the_sum_of_the_head_and_embedding_gradients(
    bf16: bool, rows: int
) -> None:
    """tied_embedding + linear_cross_entropy(tied=) against F.embedding + the unfused loss, the
    loss scaled by 1/2 as gradient accumulation does (an incoming gradient other than 1)."""
    w, ids, t, mix = tied_inputs()
    results = []
    for fused in (True, False):
        w.grad = None
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            if fused:
                tied = TiedGradient()
                x = tied_embedding(ids, w, tied)
                loss = linear_cross_entropy(torch.tanh(x @ mix), w, t, rows=rows, tied=tied)
            else:
                x = F.embedding(ids, w)
                loss = unfused(torch.tanh(x @ mix), w, t)
        (loss / 2).backward()
        results.append((loss.detach(), w.grad))
    (ours, g_ours), (theirs, g_theirs) = results
    assert g_ours.dtype == torch.float32  # type: ignore[union-attr]
    tol = {"rtol": 2e-2, "atol": 2e-4} if bf16 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(g_ours, g_theirs, **tol)


def test_a_tied_weight_receives_one_gradient_and_backward_allocates_no_second_one() -> None:
    """Autograd hands the tied weight one gradient (one accumulation, so DDP and FSDP reduce it
    once), and backward allocates no [V, H] tensor: the loss's forward made the one it gets."""
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=4099, tie_embeddings=True)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    arrivals: list[int] = []  # (a hook that kept the gradient would make autograd copy it)
    model.embed_tokens.weight.register_post_accumulate_grad_hook(lambda p: arrivals.append(1))
    loss = model(ids, targets=ids)
    weight_bytes = cfg.vocab_size * cfg.hidden_size * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    big = [
        e.name
        for e in prof.events()
        if e.cpu_memory_usage > 0 and e.cpu_memory_usage >= weight_bytes and not e.cpu_children
    ]
    assert big == []
    assert arrivals == [1]
    # The one it gets is the sum: the same as the model's logits path gives.
    fused = model.embed_tokens.weight.grad.clone()  # type: ignore[union-attr]
    model.zero_grad()
    F.cross_entropy(model(ids).view(-1, cfg.vocab_size), ids.view(-1)).backward()
    torch.testing.assert_close(fused, model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


def test_micro_batches_accumulate_into_the_tied_gradient() -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    for a in range(2):
        (model(ids[2 * a : 2 * a + 2], targets=ids[2 * a : 2 * a + 2]) / 2).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    for a in range(2):
        part = ids[2 * a : 2 * a + 2]
        (F.cross_entropy(model(part).view(-1, cfg.vocab_size), part.view(-1)) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_second_backward_through_a_kept_graph_is_refused() -> None:
    """Backward scales the saved gradients in place; a retained graph's second backward would
    use them scaled twice, so autograd's check of saved tensors refuses it."""
    w, ids, t, mix = tied_inputs()
    tied = TiedGradient()
    loss = linear_cross_entropy(torch.tanh(tied_embedding(ids, w, tied) @ mix), w, t, tied=tied)
    (loss * 0.5).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss * 0.5).backward()
