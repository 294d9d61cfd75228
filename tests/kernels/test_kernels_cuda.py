"""The CUDA ops against the references, on a GPU. Skipped where there is none (CI, laptops).

`make gpu-check` runs this file on a lent GPU machine (kernels/gpu_check.py). It covers every
dtype (float16 included), every form (functional, in place, `_out`), the kernels' inner paths
(16-byte packs and scalar elements, rows kept in registers and rows read twice, the int8 row,
tiled and tensor-core kernels), more rows than a grid dimension holds, opcheck, autograd,
torch.compile, CUDA graphs and a second stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HALVES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: {"atol": 5e-5, "rtol": 5e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}
# int8_linear: one float sum rounded once, as the reference: at most a unit in the last place.
INT8_TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-3, "rtol": 8e-3},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
}
CPU_ONLY_OPS = {
    "panel_linear",
    "panel_linear_out",
    "w8a8_linear",
    "w8a8_linear_out",
    "decode_attention",
    "decode_attention_out",
}


@pytest.fixture(scope="module")
def cuda_ops(kops: Any) -> Any:
    assert kops.HAVE_CUDA_KERNELS, (
        "a GPU is present but the extension has no CUDA kernels: build it with a CUDA torch and "
        "nvcc on PATH (KILN_BUILD_CUDA=1 makes that a build error)"
    )
    return kops


def cuda(*shape: int, dtype: Any = torch.float32) -> Any:
    return torch.randn(*shape, dtype=torch.float64, device="cuda").to(dtype)


def close(actual: Any, expected: Any, **tol: Any) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **(tol or TOL[expected.dtype]))


def close_grad_w(actual: Any, expected: Any, rows: int) -> None:
    """grad_weight sums over every row: compare in float64 with room for one rounding per sum."""
    scale = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}
    s = scale[expected.dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=s * max(rows, 1) ** 0.5, rtol=2 * s
    )


def misaligned(t: Any) -> Any:
    """The same values one element off a 16-byte boundary: the kernels' scalar paths."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


# ---------------------------------------------------------------------------------------------
# rms_norm and fused_add_rms_norm: every form, every dtype

# (1, 7): odd, scalar path; (5, 4096): 16-byte packs in registers; (2, 16411): odd and long (read
# twice in fp32); (2, 32768): too long for registers in every dtype; (300, 96): many short rows.
NORM_SHAPES = [(1, 7), (3, 17), (5, 4096), (2, 16411), (2, 32768), (300, 96), (2, 3, 100)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(cuda_ops: Any, shape: tuple[int, ...], dtype: Any) -> None:
    kiln = torch.ops.kiln
    x, r, w = cuda(*shape, dtype=dtype), cuda(*shape, dtype=dtype), cuda(shape[-1], dtype=dtype)
    want = ref.rms_norm(x, w, EPS)
    close(kiln.rms_norm(x, w, EPS), want)
    out = torch.full_like(x, float("nan"))
    kiln.rms_norm_out(x, w, EPS, out)
    close(out, want)
    xo = x.clone()
    kiln.rms_norm_out(xo, w, EPS, xo)  # out may be x itself
    close(xo, want)

    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)
    out, res = kiln.fused_add_rms_norm(x, r, w, EPS)
    close(out, want_out)
    close(res, want_res)
    xi, ri = x.clone(), r.clone()
    kiln.fused_add_rms_norm_(xi, ri, w, EPS)
    close(xi, want_out)
    close(ri, want_res)
    ro, o = r.clone(), torch.full_like(x, float("nan"))
    kiln.fused_add_rms_norm_out(x, ro, w, EPS, o)
    close(o, want_out)
    close(ro, want_res)


@pytest.mark.parametrize("shape", [(1, 7), (3, 17), (5, 4096), (2, 16411), (2, 32768)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual_grad", [False, True], ids=["no_gres", "gres"])
def test_rms_norm_backward(
    cuda_ops: Any, shape: tuple[int, ...], dtype: Any, with_residual_grad: bool
) -> None:
    g, z, w = cuda(*shape, dtype=dtype), cuda(*shape, dtype=dtype), cuda(shape[-1], dtype=dtype)
    gres = cuda(*shape, dtype=dtype) if with_residual_grad else None
    got_z, got_w = torch.ops.kiln.rms_norm_backward(g, z, w, EPS, gres)
    want_z, want_w = ref.rms_norm_backward(g, z, w, EPS, gres)
    close(got_z, want_z)
    close_grad_w(got_w, want_w, shape[0])


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_rms_norm_weight_grad_over_many_rows(cuda_ops: Any, dtype: Any) -> None:
    """Hidden 4096 over 4096 rows: the weight gradient's rows split across blocks, summed in a
    fixed order (the same result on every call)."""
    g, z, w = cuda(4096, 4096, dtype=dtype), cuda(4096, 4096, dtype=dtype), cuda(4096, dtype=dtype)
    got_z, got_w = torch.ops.kiln.rms_norm_backward(g, z, w, EPS, None)
    want_z, want_w = ref.rms_norm_backward(g, z, w, EPS, None)
    close(got_z, want_z)
    close_grad_w(got_w, want_w, 4096)
    again = torch.ops.kiln.rms_norm_backward(g, z, w, EPS, None)[1]
    assert torch.equal(again, got_w)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_norms_non_contiguous_and_misaligned(cuda_ops: Any, dtype: Any) -> None:
    x0, r0, w = cuda(6, 5, 64, dtype=dtype), cuda(6, 5, 64, dtype=dtype), cuda(64, dtype=dtype)
    want_out, want_res = ref.fused_add_rms_norm(x0, r0, w, EPS)
    # rows that one stride cannot walk (done on a copy and written back)
    x, r = x0.transpose(0, 1).contiguous().transpose(0, 1), r0.clone()
    torch.ops.kiln.fused_add_rms_norm_(x, r, w, EPS)
    close(x, want_out)
    close(r, want_res)
    # rows off 16-byte boundaries: element by element rather than in 16-byte packs
    x, r = misaligned(x0), misaligned(r0)
    torch.ops.kiln.fused_add_rms_norm_(x, r, misaligned(w), EPS)
    close(x, want_out)
    close(r, want_res)
    close(torch.ops.kiln.rms_norm(misaligned(x0), w, EPS), ref.rms_norm(x0, w, EPS))


def test_more_rows_than_a_grid_dimension(cuda_ops: Any) -> None:
    """70,000 rows and tokens: more than 65,535, the limit of a grid's y and z dimensions."""
    x, r, w = cuda(70_000, 64), cuda(70_000, 64), cuda(64)
    close(torch.ops.kiln.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
    out, res = torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)
    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)
    close(out, want_out)
    close(res, want_res)
    gz, gw = torch.ops.kiln.rms_norm_backward(x, r, w, EPS, None)
    want_gz, want_gw = ref.rms_norm_backward(x, r, w, EPS, None)
    close(gz, want_gz)
    close_grad_w(gw, want_gw, 70_000)
    s = cuda(70_000, 2 * 24) * 4
    close(torch.ops.kiln.silu_and_mul(s), ref.silu_and_mul(s))
    cache = ref.rope_cache(4096, 32, device="cuda")
    pos = torch.randint(0, 4096, (70_000,), device="cuda")
    q, k = cuda(70_000, 2, 32), cuda(70_000, 1, 32)
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache)
    got_q, got_k = torch.ops.kiln.rotary_embedding(pos, q, k, cache)
    close(got_q, want_q)
    close(got_k, want_k)


def test_more_rows_than_32_bits_count(cuda_ops: Any) -> None:
    """2^32 + 3 rows: row indices and offsets are 64-bit (a 32-bit count would wrap to 3)."""
    rows = 2**32 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.empty(rows, 1, dtype=torch.bfloat16, device="cuda")
    x[: 2**20].normal_()
    x[-(2**20) :].normal_()
    w = torch.full((1,), 2.0, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(x, float("nan"))
    torch.ops.kiln.rms_norm_out(x, w, EPS, out)
    for part in (slice(0, 2**20), slice(rows - 2**20, rows)):
        close(out[part], ref.rms_norm(x[part], w, EPS))
    del out, x
    s = torch.empty(rows, 2, dtype=torch.bfloat16, device="cuda")
    s[-(2**20) :].normal_()
    got = torch.ops.kiln.silu_and_mul(s)
    close(got[-(2**20) :], ref.silu_and_mul(s[-(2**20) :]))


# ---------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("shape", [(1, 2), (3, 34), (4, 8192), (257, 22), (2, 3, 200)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(cuda_ops: Any, shape: tuple[int, ...], dtype: Any) -> None:
    x = cuda(*shape, dtype=dtype) * 4
    want = ref.silu_and_mul(x)
    close(torch.ops.kiln.silu_and_mul(x), want)
    out = torch.full_like(want, float("nan"))
    torch.ops.kiln.silu_and_mul_out(x, out)
    close(out, want)
    g = cuda(*want.shape, dtype=dtype)
    close(torch.ops.kiln.silu_and_mul_backward(g, x), ref.silu_and_mul_backward(g, x))
    xm = misaligned(x)
    close(torch.ops.kiln.silu_and_mul(xm), want)
    close(torch.ops.kiln.silu_and_mul_backward(misaligned(g), xm), ref.silu_and_mul_backward(g, x))


# ---------------------------------------------------------------------------------------------
# rotary embedding


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(4, 2, 48, 32), (32, 8, 128, 128), (2, 2, 80, 32)], ids=str)
def test_rotary(cuda_ops: Any, is_neox: bool, dtype: Any, case: tuple[int, ...]) -> None:
    hq, hk, d, rot = case
    cache = ref.rope_cache(64, rot, dtype=dtype, device="cuda")
    pos = torch.randint(0, 64, (2, 5), device="cuda")
    q, k = cuda(2, 5, hq, d, dtype=dtype), cuda(2, 5, hk, d, dtype=dtype)
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache, is_neox)
    got_q, got_k = torch.ops.kiln.rotary_embedding(pos, q, k, cache, is_neox)
    close(got_q, want_q)
    close(got_k, want_k)
    gq, gk = cuda(*q.shape, dtype=dtype), cuda(*k.shape, dtype=dtype)
    back_q, back_k = torch.ops.kiln.rotary_embedding_backward(pos, gq, gk, cache, is_neox)
    want_gq, want_gk = ref.rotary_embedding_backward(pos, gq, gk, cache, is_neox)
    close(back_q, want_gq)
    close(back_k, want_gk)
    torch.ops.kiln.rotary_embedding_(pos, q, k, cache, is_neox)
    close(q, want_q)
    close(k, want_k)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_rotary_on_fused_qkv_views_and_backward(cuda_ops: Any, dtype: Any) -> None:
    """q and k as strided views of one [T, (Hq + 2 Hk) * D] projection (what the decoder
    passes): in place, v untouched; and the functional form's gradient through the views."""
    tokens, hq, hk, d = 9, 4, 2, 64
    cache = ref.rope_cache(32, d, dtype=dtype, device="cuda")
    pos = torch.arange(tokens, device="cuda") + 3
    qkv = cuda(tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache)
    torch.ops.kiln.rotary_embedding_(pos, q, k, cache)
    close(q, want_q)
    close(k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)

    grads = []
    for rope in (torch.ops.kiln.rotary_embedding, ref.rotary_embedding):
        leaf = qkv.detach().clone().requires_grad_()
        q = leaf[:, : hq * d].view(tokens, hq, d)
        k = leaf[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
        rq, rk = rope(pos, q, k, cache, True)
        weight = torch.linspace(-1, 1, rq.numel(), device="cuda").view_as(rq).to(dtype)
        (rq.float() * weight.float()).sum().add((rk.float() ** 2).sum()).backward()
        grads.append(leaf.grad)
    close(grads[0], grads[1])


def test_rotary_out_of_range_raises_like_cpu(cuda_ops: Any) -> None:
    cache = ref.rope_cache(64, 8, device="cuda")
    for bad in ([0, 64], [-1]):
        pos = torch.tensor(bad, device="cuda")
        q, k = cuda(len(bad), 1, 8), cuda(len(bad), 1, 8)
        with pytest.raises(RuntimeError, match=f"position {bad[-1]} .*outside the cos_sin_cache"):
            torch.ops.kiln.rotary_embedding_(pos, q, k, cache)
        with pytest.raises(RuntimeError, match=f"position {bad[-1]} .*outside the cos_sin_cache"):
            torch.ops.kiln.rotary_embedding_(pos.cpu(), q.cpu(), k.cpu(), cache.cpu())


# ---------------------------------------------------------------------------------------------
# int8 linear: row kernel (<= 8 rows), tiled kernels (more), scalar paths, K = 0


@pytest.mark.parametrize("m", [1, 5, 8, 9, 40, 300])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_int8_linear(cuda_ops: Any, m: int, dtype: Any, bias: bool) -> None:
    x = cuda(m, 1000, dtype=dtype)
    wq, scale = ref.quantize_int8(torch.randn(130, 1000))
    wq, scale = wq.cuda(), scale.cuda()
    b = cuda(130, dtype=dtype) if bias else None
    want = ref.int8_linear(x, wq, scale, b)
    close(torch.ops.kiln.int8_linear(x, wq, scale, b), want, **INT8_TOL[dtype])
    out = torch.full_like(want, float("nan"))
    torch.ops.kiln.int8_linear_out(x, wq, scale, b, out)
    close(out, want, **INT8_TOL[dtype])


@pytest.mark.parametrize("m", [3, 8, 77])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_int8_linear_scalar_paths(cuda_ops: Any, m: int, dtype: Any) -> None:
    """K % 4 != 0 and weight rows off 4-byte boundaries: element-wise weight loads; x row-strided
    and the output a column slice."""
    big = ref.quantize_int8(torch.randn(70, 1002))[0].cuda()
    wq = big[:, 1:]  # rows start one byte past a boundary, stride 1002, K = 1001
    scale = torch.rand(70, device="cuda") / 100
    x = cuda(m, 1010, dtype=dtype)[:, 3:1004]
    want = ref.int8_linear(x, wq, scale)
    close(torch.ops.kiln.int8_linear(x, wq, scale), want, **INT8_TOL[dtype])
    out = torch.full((m, 90), float("nan"), dtype=dtype, device="cuda")[:, 10:80]
    torch.ops.kiln.int8_linear_out(x, wq, scale, None, out)
    close(out, want, **INT8_TOL[dtype])


@pytest.mark.parametrize("m", [1, 8, 40])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_int8_linear_empty_k(cuda_ops: Any, m: int, dtype: Any) -> None:
    x, wq = cuda(m, 0, dtype=dtype), torch.zeros(5, 0, dtype=torch.int8, device="cuda")
    scale, b = torch.ones(5, device="cuda"), cuda(5, dtype=dtype)
    assert torch.equal(torch.ops.kiln.int8_linear(x, wq, scale, b).cpu(), b.expand(m, 5).cpu())
    out = torch.full((m, 5), float("nan"), dtype=dtype, device="cuda")
    torch.ops.kiln.int8_linear_out(x, wq, scale, None, out)
    assert torch.equal(out.cpu(), torch.zeros(m, 5, dtype=dtype))


def test_int8_linear_prefill_shape(cuda_ops: Any) -> None:
    """A Llama-sized prefill, [512, 4096] @ int8 [4096, 4096], against the reference."""
    wq, scale = ref.quantize_int8(torch.randn(4096, 4096))
    wq, scale = wq.cuda(), scale.cuda()
    for dtype in HALVES:
        x = cuda(512, 4096, dtype=dtype)
        want = ref.int8_linear(x, wq, scale)
        close(torch.ops.kiln.int8_linear(x, wq, scale), want, **INT8_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# kernels.ops on CUDA, errors, autograd, opcheck


def test_kernels_ops_send_float16_cuda_tensors_to_the_kernels(cuda_ops: Any) -> None:
    x, w = cuda(4, 256, dtype=torch.float16), cuda(256, dtype=torch.float16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        close(cuda_ops.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
    assert "kiln::rms_norm" in {e.name for e in prof.events()}


def test_device_mismatch_and_dtype_errors(cuda_ops: Any) -> None:
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        torch.ops.kiln.rms_norm(cuda(2, 8), torch.randn(8), EPS)
    ints = torch.ones(2, 8, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16 or float64"):
        torch.ops.kiln.rms_norm(ints, ints[0], EPS)


def test_gradcheck_on_gpu(cuda_ops: Any) -> None:
    def leaf(*shape: int) -> Any:
        return torch.randn(*shape, dtype=torch.float64, device="cuda", requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.kiln.fused_add_rms_norm(*a, EPS), (leaf(3, 11), leaf(3, 11), leaf(11))
    )
    assert torch.autograd.gradcheck(torch.ops.kiln.silu_and_mul, (leaf(3, 2, 14),))
    cache = ref.rope_cache(32, 8, dtype=torch.float64, device="cuda")
    pos = torch.tensor([[0, 3, 31], [7, 7, 1]], device="cuda")
    assert torch.autograd.gradcheck(
        lambda q, k: torch.ops.kiln.rotary_embedding(pos, q, k, cache, True),
        (leaf(2, 3, 2, 12), leaf(2, 3, 1, 12)),
    )


def _opcheck_cases() -> list[tuple[str, Callable[[], tuple]]]:
    def t(*shape: int, grad: bool = False, dtype: Any = torch.float32) -> Any:
        return cuda(*shape, dtype=dtype).requires_grad_(grad)

    cache = ref.rope_cache(16, 8, device="cuda")
    pos = torch.tensor([1, 5, 9], device="cuda")
    wq, scale = (a.cuda() for a in ref.quantize_int8(torch.randn(12, 16)))

    def paged_args() -> tuple:
        tables = torch.tensor([[4, 0, 2], [1, 3, 0]], device="cuda")
        lengths = torch.tensor([10, 3], device="cuda")
        return (t(2, 4, 8), t(5, 2, 4, 8), t(5, 2, 4, 8), tables, lengths, 0.5)

    return [
        ("rms_norm", lambda: (t(3, 16, grad=True), t(16, grad=True), EPS)),
        ("rms_norm_out", lambda: (t(3, 16), t(16), EPS, t(3, 16))),
        ("rms_norm_backward", lambda: (t(3, 16), t(3, 16), t(16), EPS, t(3, 16))),
        (
            "fused_add_rms_norm",
            lambda: (t(3, 16, grad=True), t(3, 16, grad=True), t(16, grad=True), EPS),
        ),
        ("fused_add_rms_norm_", lambda: (t(3, 16), t(3, 16), t(16), EPS)),
        ("fused_add_rms_norm_out", lambda: (t(3, 16), t(3, 16), t(16), EPS, t(3, 16))),
        ("silu_and_mul", lambda: (t(3, 2, 16, grad=True),)),
        ("silu_and_mul_out", lambda: (t(3, 16), t(3, 8))),
        ("silu_and_mul_backward", lambda: (t(3, 8), t(3, 16))),
        (
            "rotary_embedding",
            lambda: (pos, t(3, 2, 8, grad=True), t(3, 1, 8, grad=True), cache, True),
        ),
        ("rotary_embedding_", lambda: (pos, t(3, 2, 8), t(3, 1, 8), cache, False)),
        ("rotary_embedding_backward", lambda: (pos, t(3, 2, 8), t(3, 1, 8), cache, True)),
        ("int8_linear", lambda: (t(2, 16), wq, scale, t(12))),
        ("int8_linear_out", lambda: (t(20, 16), wq, scale, None, t(20, 12))),
        ("paged_decode_attention", paged_args),
        ("paged_decode_attention_out", lambda: (*paged_args(), t(2, 4, 8))),
    ]


OPCHECK_NAMES = [
    "rms_norm",
    "rms_norm_out",
    "rms_norm_backward",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "fused_add_rms_norm_out",
    "silu_and_mul",
    "silu_and_mul_out",
    "silu_and_mul_backward",
    "rotary_embedding",
    "rotary_embedding_",
    "rotary_embedding_backward",
    "int8_linear",
    "int8_linear_out",
    "paged_decode_attention",
    "paged_decode_attention_out",
]


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck_on_gpu(cuda_ops: Any, name: str) -> None:
    make_args = dict(_opcheck_cases())[name]
    torch.library.opcheck(getattr(torch.ops.kiln, name).default, make_args())


def test_opcheck_covers_every_cuda_op(cuda_ops: Any) -> None:
    assert sorted(OPCHECK_NAMES) == sorted(set(cuda_ops.OP_NAMES) - CPU_ONLY_OPS)
    assert sorted(n for n, _ in _opcheck_cases()) == sorted(OPCHECK_NAMES)


# ---------------------------------------------------------------------------------------------
# paged decode attention


def _paged_case(dtype: Any, d: int, block: int, seed: int = 0) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed)
    blocks, hkv, hq = 40, 2, 6
    kv = torch.randn(2, blocks, hkv, block, d, generator=gen).to("cuda", dtype)
    q = torch.randn(4, hq, d, generator=gen).to("cuda", dtype)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:9] for _ in range(4)]).cuda()
    lengths = torch.tensor([1, block * 9, 17, block * 4 + 1], device="cuda")
    return q, kv[0], kv[1], tables, lengths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("d", "block"), [(64, 16), (128, 16), (48, 5)], ids=str)
def test_paged_decode_attention(cuda_ops: Any, dtype: Any, d: int, block: int) -> None:
    q, k, v, tables, lengths = _paged_case(dtype, d, block)
    got = torch.ops.kiln.paged_decode_attention(q, k, v, tables, lengths, 0.3)
    want = ref.paged_decode_attention(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lengths.cpu(), 0.3)
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    out = torch.empty_like(q.transpose(0, 1)).transpose(0, 1)
    torch.ops.kiln.paged_decode_attention_out(q, k, v, tables, lengths, 0.3, out)
    assert torch.equal(out, got)


def test_paged_decode_attention_is_batch_invariant_on_gpu(cuda_ops: Any) -> None:
    q, k, v, tables, lengths = _paged_case(torch.bfloat16, 128, 16, seed=1)
    together = torch.ops.kiln.paged_decode_attention(q, k, v, tables, lengths, 1.0)
    for b in range(q.shape[0]):
        alone = torch.ops.kiln.paged_decode_attention(
            q[b : b + 1], k, v, tables[b : b + 1], lengths[b : b + 1], 1.0
        )
        assert torch.equal(alone[0], together[b]), b


def test_paged_decode_attention_long_context_and_bad_tables(cuda_ops: Any) -> None:
    """Past 48 KiB of scores (16k positions) the kernel opts into more shared memory; a block id
    outside the cache gives NaN (no host check, so CUDA graphs can capture the op)."""
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(2, 1100, 1, 16, 64, generator=gen).to("cuda", torch.bfloat16)
    q = torch.randn(1, 2, 64, generator=gen).to("cuda", torch.bfloat16)
    tables = torch.randperm(1100, generator=gen)[:1050].view(1, -1).cuda()
    lengths = torch.tensor([16_500], device="cuda")
    got = torch.ops.kiln.paged_decode_attention(q, kv[0], kv[1], tables, lengths, 0.125)
    want = ref.paged_decode_attention(
        q.cpu(), kv[0].cpu(), kv[1].cpu(), tables.cpu(), lengths.cpu(), 0.125
    )
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.bfloat16])
    tables[0, 3] = 5000
    bad = torch.ops.kiln.paged_decode_attention(q, kv[0], kv[1], tables, lengths, 0.125)
    assert torch.isnan(bad).all()


# ---------------------------------------------------------------------------------------------
# torch.compile, CUDA graphs, a second stream


def test_torch_compile_forward_and_backward_on_cuda(cuda_ops: Any) -> None:
    torch._dynamo.reset()
    t, hq, d = 6, 4, 16
    hidden = hq * d
    cache = ref.rope_cache(64, d, device="cuda")
    pos = torch.arange(t, device="cuda")

    def f(ops: Any, x: Any, r: Any, w: Any) -> Any:
        h, res = ops.fused_add_rms_norm(x * 2, r, w, EPS)
        q, k = ops.rotary_embedding(pos, h.view(t, hq, d), res.view(t, hq, d), cache, True)
        return (ops.silu_and_mul(torch.cat([q, k], -1).view(t, -1)).sum(-1) * res.mean(-1)).sum()

    leaves = [cuda(t, hidden), cuda(t, hidden), 1 + cuda(hidden) * 0.1]
    results = []
    for fn, ops in ((torch.compile(f, fullgraph=True), torch.ops.kiln), (f, ref)):
        args = [a.clone().requires_grad_() for a in leaves]
        loss = fn(ops, *args)
        loss.backward()
        results.append([loss.detach()] + [a.grad for a in args])
    for got, want in zip(*results, strict=True):
        close(got, want, atol=1e-4, rtol=1e-4)


def _decode_step(x: Any, r: Any, w: Any, pos: Any, cache: Any, wq: Any, scale: Any, act: Any,
                 out: Any) -> None:  # fmt: skip
    """A decode step's kernels in their in-place and `out` forms (no allocation)."""
    kiln = torch.ops.kiln
    kiln.fused_add_rms_norm_(x, r, w, EPS)
    q = x.view(x.shape[0], -1, 32)
    kiln.rotary_embedding_(pos, q[:, :2], q[:, 2:], cache, True)
    kiln.silu_and_mul_out(x, act)
    kiln.int8_linear_out(act, wq, scale, None, out)


def _decode_reference(x: Any, r: Any, w: Any, pos: Any, cache: Any, wq: Any, scale: Any) -> Any:
    h, res = ref.fused_add_rms_norm(x, r, w, EPS)
    q = h.view(x.shape[0], -1, 32)
    rq, rk = ref.rotary_embedding(pos, q[:, :2], q[:, 2:], cache)
    h = torch.cat([rq, rk], 1).view_as(x)
    return ref.int8_linear(ref.silu_and_mul(h), wq, scale), res


def test_cuda_graph_capture_and_replay(cuda_ops: Any) -> None:
    rows, hidden = 4, 128
    cache = ref.rope_cache(64, 32, device="cuda")
    wq, scale = (a.cuda() for a in ref.quantize_int8(torch.randn(48, hidden // 2)))
    w = cuda(hidden)
    x, r = cuda(rows, hidden), cuda(rows, hidden)
    pos = torch.randint(0, 64, (rows,), device="cuda")
    act = torch.empty(rows, hidden // 2, device="cuda")
    out = torch.empty(rows, 48, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph, as CUDA graphs require
        _decode_step(x.clone(), r.clone(), w, pos, cache, wq, scale, act, out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _decode_step(x, r, w, pos, cache, wq, scale, act, out)
    for _ in range(3):
        x0, r0 = cuda(rows, hidden), cuda(rows, hidden)
        pos.copy_(torch.randint(0, 64, (rows,)))
        x.copy_(x0)
        r.copy_(r0)
        graph.replay()
        want_out, want_res = _decode_reference(x0, r0, w, pos, cache, wq, scale)
        close(out, want_out, atol=1e-3, rtol=1e-3)
        close(r, want_res)


def test_rotary_out_of_range_inside_a_cuda_graph_gives_nan(cuda_ops: Any) -> None:
    """No host check while capturing (it would sync): the kernel marks the token instead."""
    cache = ref.rope_cache(8, 8, device="cuda")
    pos = torch.tensor([1, 2], device="cuda")
    q, k = cuda(2, 1, 8), cuda(2, 1, 8)
    torch.ops.kiln.rotary_embedding_(pos, q, k, cache)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.kiln.rotary_embedding_(pos, q, k, cache)
    pos.copy_(torch.tensor([1, 9]))
    graph.replay()
    torch.cuda.synchronize()
    assert not q[0].isnan().any() and q[1].isnan().all() and k[1].isnan().all()


def test_second_stream(cuda_ops: Any) -> None:
    """The kernels run on the current stream: behind a slow producer on a side stream they see
    its result (on the default stream they would read the buffer before it is filled)."""
    src, w = cuda(64, 1024), cuda(1024)
    x = torch.zeros_like(src)
    out = torch.zeros_like(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time
        x.copy_(src)
        torch.ops.kiln.rms_norm_out(x, w, EPS, out)
        got = torch.ops.kiln.silu_and_mul(x)
    side.synchronize()
    close(out, ref.rms_norm(src, w, EPS))
    close(got, ref.silu_and_mul(src))
