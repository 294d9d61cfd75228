"""The CUDA ops against the references, on a GPU. Skipped where there is none (CI, laptops)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {
    torch.float32: {"atol": 5e-5, "rtol": 5e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}


@pytest.fixture(scope="module")
def cuda_ops(kops: Any) -> Any:
    assert kops.HAVE_CUDA_KERNELS, (
        "a GPU is present but the extension has no CUDA kernels: build it with a CUDA torch and "
        "nvcc on PATH (KILN_BUILD_CUDA=1 makes that a build error)"
    )
    return kops


def cuda(*shape: int, dtype: Any = torch.float32) -> Any:
    return torch.randn(*shape, dtype=torch.float64).to(dtype).cuda()


def close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOL[expected.dtype])


@pytest.mark.parametrize("shape", [(1, 7), (3, 17), (5, 4096), (2, 16411), (300, 96)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms(cuda_ops: Any, shape: tuple[int, ...], dtype: Any) -> None:
    x, r, w = cuda(*shape, dtype=dtype), cuda(*shape, dtype=dtype), cuda(shape[-1], dtype=dtype)
    close(torch.ops.kiln.rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS))
    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)
    out, res = torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)
    close(out, want_out)
    close(res, want_res)
    xi, ri = x.clone(), r.clone()
    torch.ops.kiln.fused_add_rms_norm_(xi, ri, w, EPS)
    close(xi, want_out)
    close(ri, want_res)
    g = cuda(*shape, dtype=dtype)
    got_z, got_w = torch.ops.kiln.rms_norm_backward(g, r, w, EPS, x)
    want_z, want_w = ref.rms_norm_backward(g, r, w, EPS, x)
    close(got_z, want_z)
    torch.testing.assert_close(
        got_w.double().cpu(), want_w.double().cpu(), atol=1e-2 * shape[0] ** 0.5, rtol=2e-2
    )


def test_norm_non_contiguous(cuda_ops: Any) -> None:
    x = cuda(6, 5, 67).transpose(0, 1)
    r = cuda(5, 6, 80)[..., :67]
    w = cuda(67)
    want_out, want_res = ref.fused_add_rms_norm(x, r, w, EPS)
    torch.ops.kiln.fused_add_rms_norm_(x, r, w, EPS)
    close(x, want_out)
    close(r, want_res)


@pytest.mark.parametrize("shape", [(1, 2), (3, 34), (4, 8192), (257, 22)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(cuda_ops: Any, shape: tuple[int, ...], dtype: Any) -> None:
    x = cuda(*shape, dtype=dtype) * 4
    want = ref.silu_and_mul(x)
    close(torch.ops.kiln.silu_and_mul(x), want)
    g = cuda(*want.shape, dtype=dtype)
    close(torch.ops.kiln.silu_and_mul_backward(g, x), ref.silu_and_mul_backward(g, x))


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(cuda_ops: Any, is_neox: bool, dtype: Any) -> None:
    cache = ref.rope_cache(64, 32, dtype=dtype, device="cuda")
    pos = torch.randint(0, 64, (2, 5), device="cuda")
    q, k = cuda(2, 5, 4, 48, dtype=dtype), cuda(2, 5, 2, 48, dtype=dtype)
    want_q, want_k = ref.rotary_embedding(pos, q, k, cache, is_neox)
    torch.ops.kiln.rotary_embedding_(pos, q, k, cache, is_neox)
    close(q, want_q)
    close(k, want_k)


@pytest.mark.parametrize("m", [1, 5, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear(cuda_ops: Any, m: int, dtype: Any) -> None:
    x = cuda(m, 1000, dtype=dtype)
    wq, scale = ref.quantize_int8(torch.randn(130, 1000))
    wq, scale, b = wq.cuda(), scale.cuda(), cuda(130, dtype=dtype)
    tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(
        torch.ops.kiln.int8_linear(x, wq, scale, b).cpu(),
        ref.int8_linear(x, wq, scale, b).cpu(),
        **tol,
    )


def test_device_mismatch_is_a_clear_error(cuda_ops: Any) -> None:
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        torch.ops.kiln.rms_norm(cuda(2, 8), torch.randn(8), EPS)


def test_gradcheck_on_gpu(cuda_ops: Any) -> None:
    x = torch.randn(3, 11, dtype=torch.float64, device="cuda", requires_grad=True)
    r = torch.randn(3, 11, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.kiln.fused_add_rms_norm(*a, EPS), (x, r, w)
    )


def test_opcheck_on_gpu(cuda_ops: Any) -> None:
    x, w = cuda(3, 16).requires_grad_(), cuda(16).requires_grad_()
    torch.library.opcheck(torch.ops.kiln.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.kiln.silu_and_mul.default, (cuda(3, 16).requires_grad_(),))
