"""The compiled CPU ops against their pure-PyTorch references: shapes, dtypes, layouts, variants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# One bf16/fp16 rounding may land on the other side of a tie when the sums run in another order.
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
    torch.float64: {"atol": 1e-12, "rtol": 1e-12},
}
HALVES = [torch.float32, torch.bfloat16, torch.float16]  # what training and serving run in
EPS = 1e-5
# One row, tiny and odd widths (not a multiple of any vector width), batched leading dims, a
# model-sized row, a large odd row, many rows (several threads), no rows at all.
NORM_SHAPES = [(1, 1), (1, 7), (3, 17), (2, 3, 100), (5, 4096), (2, 16411), (300, 96), (0, 16)]


def close(actual: Any, expected: Any, dtype: Any = None) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol)


def randn(*shape: int, dtype: Any = torch.float32) -> Any:
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def layout(t: Any, kind: str) -> Any:
    """The same values in another memory layout (t has at least 2 dims)."""
    if kind == "contiguous":
        return t
    if kind == "row_padded":  # rows further apart than their width: one stride still walks them
        base = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        base[..., : t.shape[-1]] = t
        return base[..., : t.shape[-1]]
    if kind == "transposed":  # leading dims swapped: rows need a copy
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "strided_last":  # every other element of a wider row: the last dim is not dense
        base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        base[..., ::2] = t
        return base[..., ::2]
    raise AssertionError(kind)


LAYOUTS = ["contiguous", "row_padded", "transposed", "strided_last"]


# ---------------------------------------------------------------------------------------------
# rms_norm and fused_add_rms_norm


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(kops: Any, cpu_variant: str, shape: tuple[int, ...], dtype: Any) -> None:
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    close(torch.ops.kiln.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
    out = torch.empty_like(x)
    torch.ops.kiln.rms_norm_out(x, w, EPS, out)
    close(out, ref.rms_norm(x, w, EPS))


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_forms(
    kops: Any, cpu_variant: str, shape: tuple[int, ...], dtype: Any
) -> None:
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)

    out, res = torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)
    close(out, want_out)
    close(res, want_res)

    xi, ri = x.clone(), r.clone()
    torch.ops.kiln.fused_add_rms_norm_(xi, ri, w, EPS)
    close(xi, want_out)
    close(ri, want_res)

    ro, o = r.clone(), torch.empty_like(x)
    torch.ops.kiln.fused_add_rms_norm_out(x, ro, w, EPS, o)
    close(o, want_out)
    close(ro, want_res)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_norms_non_contiguous(kops: Any, cpu_variant: str, kind: str, dtype: Any) -> None:
    x0, r0 = randn(6, 5, 67, dtype=dtype), randn(6, 5, 67, dtype=dtype)
    w = layout(randn(2, 67, dtype=dtype), "strided_last")[0]  # a non-contiguous weight too
    want_out, want_res = ref.fused_add_rms_norm(x0, r0, w, EPS)

    close(torch.ops.kiln.rms_norm(layout(x0, kind), w, EPS), ref.rms_norm(x0, w, EPS))
    out, res = torch.ops.kiln.fused_add_rms_norm(layout(x0, kind), layout(r0, kind), w, EPS)
    close(out, want_out)
    close(res, want_res)

    # In place on non-contiguous targets: the results land in the caller's tensors.
    x, r = layout(x0.clone(), kind), layout(r0.clone(), kind)
    torch.ops.kiln.fused_add_rms_norm_(x, r, w, EPS)
    close(x, want_out)
    close(r, want_res)

    r, out = layout(r0.clone(), kind), layout(torch.zeros_like(x0), kind)
    torch.ops.kiln.fused_add_rms_norm_out(layout(x0, kind), r, w, EPS, out)
    close(out, want_out)
    close(r, want_res)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_propagate_nan_and_inf(kops: Any, cpu_variant: str, dtype: Any) -> None:
    x, r, w = randn(4, 33, dtype=dtype), randn(4, 33, dtype=dtype), randn(33, dtype=dtype)
    x[0, 3], x[1, 32], r[2, 0] = float("nan"), float("inf"), float("-inf")
    x[3, 5] = torch.finfo(dtype).max  # the sum rounds up to inf
    r[3, 5] = torch.finfo(dtype).max
    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)
    out, res = torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)
    torch.testing.assert_close(res, want_res, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(out.isnan(), want_out.isnan())
    assert out[0].isnan().all()  # one NaN makes the whole row's rstd NaN
    torch.testing.assert_close(
        torch.ops.kiln.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS), equal_nan=True, **TOL[dtype]
    )


@pytest.mark.parametrize("shape", [(1, 7), (3, 17), (5, 4096), (300, 96), (2, 3, 100)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual_grad", [False, True])
def test_rms_norm_backward(
    kops: Any, cpu_variant: str, shape: tuple[int, ...], dtype: Any, with_residual_grad: bool
) -> None:
    g, z, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    gres = randn(*shape, dtype=dtype) if with_residual_grad else None
    got_z, got_w = torch.ops.kiln.rms_norm_backward(g, z, w, EPS, gres)
    want_z, want_w = ref.rms_norm_backward(g, z, w, EPS, gres)
    close(got_z, want_z)
    # dw sums over all rows: compare in float64, with room for the bf16 rounding of one sum
    rows = max(1, z.numel() // shape[-1])
    scale = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-11}[
        dtype
    ]
    torch.testing.assert_close(
        got_w.double(), want_w.double(), atol=scale * rows**0.5, rtol=scale * 2
    )


# ---------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize(
    "shape", [(1, 2), (1, 14), (3, 34), (2, 3, 200), (4, 8192), (257, 22)], ids=str
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(kops: Any, cpu_variant: str, shape: tuple[int, ...], dtype: Any) -> None:
    x = randn(*shape, dtype=dtype) * 4  # wide enough to reach both tails of the sigmoid
    want = ref.silu_and_mul(x)
    close(torch.ops.kiln.silu_and_mul(x), want)
    out = torch.empty_like(want)
    torch.ops.kiln.silu_and_mul_out(x, out)
    close(out, want)
    g = randn(*want.shape, dtype=dtype)
    close(torch.ops.kiln.silu_and_mul_backward(g, x), ref.silu_and_mul_backward(g, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_extremes(kops: Any, cpu_variant: str, dtype: Any) -> None:
    gate = [-1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 1e4, float("nan"), float("inf")]
    x = torch.tensor([gate + [1.0] * len(gate)], dtype=dtype)
    torch.testing.assert_close(
        torch.ops.kiln.silu_and_mul(x), ref.silu_and_mul(x), rtol=1e-5, atol=1e-6, equal_nan=True
    )


@pytest.mark.parametrize("kind", LAYOUTS)
def test_silu_and_mul_non_contiguous(kops: Any, cpu_variant: str, kind: str) -> None:
    x0 = randn(4, 3, 38)
    want = ref.silu_and_mul(x0)
    close(torch.ops.kiln.silu_and_mul(layout(x0, kind)), want)
    out = layout(torch.zeros_like(want), kind)
    torch.ops.kiln.silu_and_mul_out(layout(x0, kind), out)
    close(out, want)
    g = layout(randn(*want.shape), kind)
    close(
        torch.ops.kiln.silu_and_mul_backward(g, layout(x0, kind)), ref.silu_and_mul_backward(g, x0)
    )


# ---------------------------------------------------------------------------------------------
# rotary embedding


ROTARY_CASES = [
    # (positions shape, q heads, k heads, head_size, rot_dim)
    ((1,), 4, 4, 64, 64),  # one decode step
    ((7,), 8, 2, 128, 128),  # prefill, grouped-query attention
    ((2, 5), 3, 1, 32, 32),  # batched [B, S] positions
    ((3,), 2, 2, 80, 32),  # partial rotary: only the first 32 features turn
    ((5,), 1, 1, 6, 6),  # odd pair count
    ((0,), 2, 2, 16, 16),  # no tokens
]


@pytest.mark.parametrize("case", ROTARY_CASES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(kops: Any, cpu_variant: str, case: tuple, is_neox: bool, dtype: Any) -> None:
    pshape, hq, hk, d, rot = case
    cache = ref.rope_cache(64, rot, dtype=dtype)
    pos = torch.randint(0, 64, pshape)
    q, k = randn(*pshape, hq, d, dtype=dtype), randn(*pshape, hk, d, dtype=dtype)
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache, is_neox)

    got_q, got_k = torch.ops.kiln.rotary_embedding(pos, q, k, cache, is_neox)
    close(got_q, want_q)
    close(got_k, want_k)

    qi, ki = q.clone(), k.clone()
    torch.ops.kiln.rotary_embedding_(pos, qi, ki, cache, is_neox)
    close(qi, want_q)
    close(ki, want_k)

    gq, gk = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    back_q, back_k = torch.ops.kiln.rotary_embedding_backward(pos, gq, gk, cache, is_neox)
    want_gq, want_gk = ref.rotary_embedding_backward(pos, gq, gk, cache, is_neox)
    close(back_q, want_gq)
    close(back_k, want_gk)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_rotary_on_fused_qkv_views(kops: Any, cpu_variant: str, dtype: Any) -> None:
    """q and k as views into one [T, (Hq + 2 Hk) * D] projection output, rotated in place."""
    tokens, hq, hk, d = 9, 4, 2, 64
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    cache = ref.rope_cache(32, d, dtype=dtype)
    pos = torch.arange(tokens) + 3
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache)
    torch.ops.kiln.rotary_embedding_(pos, q, k, cache)
    close(q, want_q)
    close(k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)  # v untouched

    # heads not evenly strided (a transposed view): done on a copy and written back
    qt = randn(hq, tokens, d, dtype=dtype).transpose(0, 1)
    kt = randn(hk, tokens, d, dtype=dtype).transpose(0, 1)
    want_q, want_k = ref.rotary_embedding(pos, qt, kt, cache)
    torch.ops.kiln.rotary_embedding_(pos, qt, kt, cache)
    close(qt, want_q)
    close(kt, want_k)


# ---------------------------------------------------------------------------------------------
# weight-only int8 linear


# Tight: one rounding of a float sum, so a result differs from the reference by at most one unit
# in the last place of the output dtype (a tie rounded the other way after another sum order).
INT8_TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-3, "rtol": 8e-3},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
}


@pytest.mark.parametrize("m", [1, 3, 5, 8, 9, 40, 70])  # 70: past the kernel, float matmul
@pytest.mark.parametrize("n_k", [(1, 1), (37, 33), (64, 256), (130, 1000)], ids=str)
@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int8_linear(
    kops: Any, cpu_variant: str, m: int, n_k: tuple[int, int], dtype: Any, bias: bool
) -> None:
    n, k = n_k
    x = randn(m, k, dtype=dtype)
    wq, scale = ref.quantize_int8(randn(n, k))
    b = randn(n, dtype=dtype) if bias else None
    want = ref.int8_linear(x, wq, scale, b)
    tol = INT8_TOL[dtype]
    torch.testing.assert_close(torch.ops.kiln.int8_linear(x, wq, scale, b), want, **tol)
    out = torch.empty_like(want)
    torch.ops.kiln.int8_linear_out(x, wq, scale, b, out)
    torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("m", [1, 3, 70])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_int8_linear_empty_k_gives_the_bias(kops: Any, m: int, dtype: Any) -> None:
    """K = 0: every output is an empty sum, i.e. its bias (or zero), never uninitialized memory."""
    x, wq, scale = randn(m, 0, dtype=dtype), torch.zeros(5, 0, dtype=torch.int8), torch.ones(5)
    b = randn(5, dtype=dtype)
    assert torch.equal(torch.ops.kiln.int8_linear(x, wq, scale, b), b.expand(m, 5))
    zeros = torch.zeros(m, 5, dtype=dtype)
    assert torch.equal(torch.ops.kiln.int8_linear(x, wq, scale, None), zeros)
    out = torch.full((m, 5), float("nan"), dtype=dtype)
    torch.ops.kiln.int8_linear_out(x, wq, scale, b, out)
    assert torch.equal(out, b.expand(m, 5))
    out = torch.full((m, 5), float("nan"), dtype=dtype)
    torch.ops.kiln.int8_linear_out(x, wq, scale, None, out)
    assert torch.equal(out, zeros)


def test_int8_linear_batched_and_strided(kops: Any, cpu_variant: str) -> None:
    x = randn(2, 3, 64)[:, :, ::1]
    wq, scale = ref.quantize_int8(randn(20, 128))
    wq = wq[:, ::2]  # a column-strided weight is copied, not misread
    want = ref.int8_linear(x, wq, scale)
    torch.testing.assert_close(torch.ops.kiln.int8_linear(x, wq, scale), want, atol=1e-4, rtol=1e-4)


def test_quantize_int8_round_trip() -> None:
    w = randn(16, 64)
    wq, scale = ref.quantize_int8(w)
    assert wq.dtype == torch.int8 and scale.dtype == torch.float32
    assert (wq.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6


# ---------------------------------------------------------------------------------------------
# clear errors instead of crashes


def _norm_args() -> tuple[Any, Any]:
    return randn(4, 8), randn(8)


ERROR_CASES: list[tuple[str, Callable[[], Any], str]] = [
    (
        "weight shape",
        lambda: torch.ops.kiln.rms_norm(randn(4, 8), randn(7), EPS),
        r"weight must have shape \[8\]",
    ),
    (
        "dtype mismatch",
        lambda: torch.ops.kiln.rms_norm(randn(4, 8), randn(8, dtype=torch.bfloat16), EPS),
        "weight is BFloat16 but x is Float",
    ),
    (
        "integer input",
        lambda: torch.ops.kiln.rms_norm(
            torch.ones(4, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), EPS
        ),
        "x must be float32, bfloat16, float16 or float64",
    ),
    (
        "negative eps",
        lambda: torch.ops.kiln.rms_norm(randn(4, 8), randn(8), -1.0),
        "eps must be >= 0",
    ),
    (
        "0-d input",
        lambda: torch.ops.kiln.rms_norm(torch.tensor(1.0), randn(1), EPS),
        "at least one dimension",
    ),
    (
        "out shape",
        lambda: torch.ops.kiln.rms_norm_out(randn(4, 8), randn(8), EPS, randn(4, 9)),
        r"out must have shape \[4, 8\]",
    ),
    (
        "expanded out",
        lambda: torch.ops.kiln.rms_norm_out(randn(4, 8), randn(8), EPS, randn(1, 8).expand(4, 8)),
        "share memory",
    ),
    (
        "residual shape",
        lambda: torch.ops.kiln.fused_add_rms_norm(randn(4, 8), randn(3, 8), randn(8), EPS),
        r"residual must have shape \[4, 8\]",
    ),
    (
        "aliased in-place args",
        lambda: (lambda t: torch.ops.kiln.fused_add_rms_norm_(t, t, randn(8), EPS))(randn(4, 8)),
        "overlap in memory",
    ),
    ("odd silu width", lambda: torch.ops.kiln.silu_and_mul(randn(4, 7)), "must be even"),
    (
        "silu out shape",
        lambda: torch.ops.kiln.silu_and_mul_out(randn(4, 8), randn(4, 8)),
        r"out must have shape \[4, 4\]",
    ),
    (
        "rotary position range",
        lambda: torch.ops.kiln.rotary_embedding(
            torch.tensor([0, 64]), randn(2, 1, 8), randn(2, 1, 8), ref.rope_cache(64, 8)
        ),
        "position 64 .* outside the cos_sin_cache",
    ),
    (
        "negative position",
        lambda: torch.ops.kiln.rotary_embedding(
            torch.tensor([-1]), randn(1, 1, 8), randn(1, 1, 8), ref.rope_cache(64, 8)
        ),
        "position -1",
    ),
    (
        "rotary positions dtype",
        lambda: torch.ops.kiln.rotary_embedding(
            torch.tensor([0], dtype=torch.int32),
            randn(1, 1, 8),
            randn(1, 1, 8),
            ref.rope_cache(4, 8),
        ),
        "positions must be int64",
    ),
    (
        "rotary rot_dim",
        lambda: torch.ops.kiln.rotary_embedding(
            torch.tensor([0]), randn(1, 1, 8), randn(1, 1, 8), randn(4, 10)
        ),
        "must be even and at most head_size",
    ),
    (
        "rotary leading dims",
        lambda: torch.ops.kiln.rotary_embedding(
            torch.tensor([0, 1]), randn(3, 1, 8), randn(3, 1, 8), ref.rope_cache(4, 8)
        ),
        "must start with positions' shape",
    ),
    (
        "int8 weight dtype",
        lambda: torch.ops.kiln.int8_linear(randn(2, 8), randn(4, 8), torch.ones(4)),
        "weight must be int8",
    ),
    (
        "int8 weight shape",
        lambda: torch.ops.kiln.int8_linear(
            randn(2, 8), torch.ones(4, 9, dtype=torch.int8), torch.ones(4)
        ),
        r"weight must be \[out_features, 8\]",
    ),
    (
        "int8 float64 input",
        lambda: torch.ops.kiln.int8_linear(
            randn(2, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)
        ),
        "x must be float32, bfloat16 or float16",
    ),
    (
        "int8 scale shape",
        lambda: torch.ops.kiln.int8_linear(
            randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(3)
        ),
        r"scale must be \[4\]",
    ),
]


@pytest.mark.parametrize(("name", "call", "match"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_are_clear(kops: Any, name: str, call: Callable[[], Any], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# the CPU variants


def test_best_cpu_variant_is_chosen_at_import(kops: Any) -> None:
    import os

    forced = os.environ.get("KILN_CPU_ISA")
    assert kops.cpu_isa() == (forced if forced in kops.cpu_isas() else kops.cpu_isas()[0])
    assert "generic" in kops.cpu_isas()


def test_unknown_cpu_variant_is_refused(kops: Any) -> None:
    with pytest.raises(ValueError, match="no CPU variant 'sse9'"):
        kops.set_cpu_isa("sse9")


def test_variants_agree_bitwise_on_float64(kops: Any) -> None:
    """Each variant is a real, separate build of the same source: same answers, different code."""
    x, r, w = (
        randn(3, 1000, dtype=torch.float64),
        randn(3, 1000, dtype=torch.float64),
        randn(1000, dtype=torch.float64),
    )
    results = []
    for name in kops.cpu_isas():
        with kops.use_cpu_isa(name):
            results.append(torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS))
    for out, res in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-12, rtol=1e-12)
        assert torch.equal(res, results[0][1])


def test_float16_conversions_are_exact_on_every_bit_pattern(kops: Any, cpu_variant: str) -> None:
    """The kernels' own float16 <-> float conversions (integer arithmetic, no F16C): the residual
    sum x + r rounded once to float16 is bitwise torch's, over every float16 bit pattern
    (subnormals, the largest values, infinities), against values that make the sums overflow,
    land between subnormals and tie."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16).reshape(256, 256)
    x = torch.where(x.isnan(), torch.zeros_like(x), x)  # NaN payloads may differ; checked below
    gen = torch.Generator().manual_seed(0)
    r = (torch.randn(256, 256, generator=gen, dtype=torch.float64) * 1e-5).to(torch.float16)
    r[::7] = torch.finfo(torch.float16).max  # overflow to inf
    r[1::7] = 0.0
    r[2::7] = 2.0**-11  # half a unit at 1.0: 1 + r is a tie, rounded to even
    w = torch.ones(256, dtype=torch.float16)
    _, res = torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)
    _, want = ref.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(res.view(torch.int16), want.view(torch.int16))
    nan = torch.full((1, 4), float("nan"), dtype=torch.float16)
    _, res = torch.ops.kiln.fused_add_rms_norm(nan, torch.zeros_like(nan), w[:4], EPS)
    assert res.isnan().all()


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_kernels_ops_run_the_compiled_ops_for_every_serving_dtype(kops: Any, dtype: Any) -> None:
    """kernels.ops sends float32, bfloat16 and float16 CPU tensors to the compiled kernels, not to
    the references (the profiler records each kiln op the dispatcher runs)."""
    x, r, w = randn(3, 64, dtype=dtype), randn(3, 64, dtype=dtype), randn(64, dtype=dtype)
    cache = ref.rope_cache(16, 16, dtype=dtype)
    wq, scale = ref.quantize_int8(randn(8, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        close(kops.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
        kops.fused_add_rms_norm_(x.clone(), r.clone(), w, EPS)
        close(kops.silu_and_mul(x), ref.silu_and_mul(x))
        q, k = randn(3, 2, 16, dtype=dtype), randn(3, 1, 16, dtype=dtype)
        kops.rotary_embedding_(torch.tensor([0, 5, 9]), q, k, cache)
        close(kops.int8_linear(x, wq, scale, None), ref.int8_linear(x, wq, scale), dtype=dtype)
    ran = {e.name for e in prof.events()}
    for name in ("rms_norm", "fused_add_rms_norm_", "silu_and_mul", "rotary_embedding_"):
        assert f"kiln::{name}" in ran, sorted(n for n in ran if "kiln" in n)
    assert "kiln::int8_linear" in ran
