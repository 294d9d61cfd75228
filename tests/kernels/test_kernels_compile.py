"""torch.compile(fullgraph=True) over transformer blocks built from the kiln ops: no graph break."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402

EPS = 1e-6
T, HQ, HK, D = 6, 4, 2, 16  # tokens, query heads, key heads, head size
HIDDEN, FFN = HQ * D, 96


def _params(dtype: Any = torch.float32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)

    def p(*shape: int) -> Any:
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    return {
        "norm1": 1 + p(HIDDEN),
        "norm2": 1 + p(HIDDEN),
        "qkv": p((HQ + 2 * HK) * D, HIDDEN),
        "o": p(HIDDEN, HQ * D),
        "gate_up": p(2 * FFN, HIDDEN),
        "down": p(HIDDEN, FFN),
        "cache": ref.rope_cache(64, D, dtype=dtype),
    }


def train_block(ops: Any, P: dict[str, Any], x: Any, residual: Any, pos: Any) -> tuple[Any, Any]:
    """One pre-norm decoder layer in the functional forms (what training differentiates)."""
    h, residual = ops.fused_add_rms_norm(x, residual, P["norm1"], EPS)
    qkv = h @ P["qkv"].t()
    q = qkv[:, : HQ * D].reshape(T, HQ, D)
    k = qkv[:, HQ * D : (HQ + HK) * D].reshape(T, HK, D)
    v = qkv[:, (HQ + HK) * D :].reshape(T, HK, D)
    q, k = ops.rotary_embedding(pos, q, k, P["cache"], True)
    k, v = k.repeat_interleave(HQ // HK, 1), v.repeat_interleave(HQ // HK, 1)
    a = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    )
    x = a.transpose(0, 1).reshape(T, HQ * D) @ P["o"].t()
    h, residual = ops.fused_add_rms_norm(x, residual, P["norm2"], EPS)
    x = ops.silu_and_mul(h @ P["gate_up"].t()) @ P["down"].t()
    return x, residual


def test_compiled_training_block_forward_and_backward(kops: Any) -> None:
    """Dynamo and AOT autograd over a whole layer (the aot_eager backend: inductor's C++ codegen of
    the attention and matmuls takes ~40 s here and tests torch, not kiln; the next test runs it)."""
    torch._dynamo.reset()
    P = _params()
    pos = torch.arange(T) + 2
    x0, r0 = torch.randn(T, HIDDEN), torch.randn(T, HIDDEN)
    grads = {}
    for name, ops in (("compiled", torch.ops.kiln), ("reference", ref)):
        params = {k: v.clone().requires_grad_(k != "cache") for k, v in P.items()}
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()

        def step(x: Any, r: Any, params: dict[str, Any] = params, ops: Any = ops) -> Any:
            y, res = train_block(ops, params, x, r, pos)
            return (y * res).sum()

        fn = (
            torch.compile(step, fullgraph=True, backend="aot_eager") if name == "compiled" else step
        )
        loss = fn(x, r)
        loss.backward()
        grads[name] = [loss.detach(), x.grad, r.grad] + [
            params[k].grad for k in ("norm1", "qkv", "gate_up", "down")
        ]
    for got, want in zip(grads["compiled"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_inductor_forward_and_backward_through_the_ops(kops: Any) -> None:
    """Inductor fuses the code around the ops and calls their forward and backward kernels."""
    torch._dynamo.reset()
    P = _params()
    pos = torch.arange(T)

    def f(ops: Any, x: Any, r: Any, w: Any) -> Any:
        h, res = ops.fused_add_rms_norm(x * 2, r, w, EPS)
        q, k = ops.rotary_embedding(pos, h.view(T, HQ, D), res.view(T, HQ, D), P["cache"], True)
        return (ops.silu_and_mul(torch.cat([q, k], -1).view(T, -1)).sum(-1) * res.mean(-1)).sum()

    leaves = [torch.randn(T, HIDDEN), torch.randn(T, HIDDEN), 1 + torch.randn(HIDDEN) * 0.1]
    results = []
    for fn, ops in ((torch.compile(f, fullgraph=True), torch.ops.kiln), (f, ref)):
        args = [t.clone().requires_grad_() for t in leaves]
        loss = fn(ops, *args)
        loss.backward()
        results.append([loss.detach()] + [a.grad for a in args])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def decode_block(P: dict[str, Any], x: Any, residual: Any, pos: Any, k_cache: Any) -> None:
    """The in-place forms, as a decode step uses them: nothing allocated for the norms or rope."""
    kiln = torch.ops.kiln
    kiln.fused_add_rms_norm_(x, residual, P["norm1"], EPS)  # residual += x; x = norm(residual)
    qkv = x @ P["qkv"].t()
    q = qkv[:, : HQ * D].view(-1, HQ, D)
    k = qkv[:, HQ * D : (HQ + HK) * D].view(-1, HK, D)
    kiln.rotary_embedding_(pos, q, k, P["cache"], True)
    k_cache.copy_(k)
    h = torch.empty(x.shape[0], FFN, dtype=x.dtype)
    kiln.silu_and_mul_out(q.reshape(x.shape[0], -1) @ P["gate_up"][:, :HIDDEN].t(), h)
    x.copy_(h @ P["down"].t())


def test_compiled_decode_block_in_place(kops: Any) -> None:
    torch._dynamo.reset()
    P = _params()
    pos = torch.tensor([5])
    x0, r0 = torch.randn(1, HIDDEN), torch.randn(1, HIDDEN)
    results = []
    for fn in (decode_block, torch.compile(decode_block, fullgraph=True)):
        x, r, kc = x0.clone(), r0.clone(), torch.zeros(1, HK, D)
        fn(P, x, r, pos, kc)
        results.append((x, r, kc))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_int8_linear(kops: Any) -> None:
    torch._dynamo.reset()
    wq, scale = ref.quantize_int8(torch.randn(24, 32))
    x = torch.randn(2, 32)

    def f(x: Any) -> Any:
        return torch.relu(torch.ops.kiln.int8_linear(x, wq, scale, None)) + 1

    torch.testing.assert_close(
        torch.compile(f, fullgraph=True)(x),
        torch.relu(ref.int8_linear(x, wq, scale)) + 1,
        atol=1e-4,
        rtol=1e-4,
    )
