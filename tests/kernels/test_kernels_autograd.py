"""Registration of the kiln ops (torch.library.opcheck) and their gradients (gradcheck)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402

EPS = 1e-5


def _t(*shape: int, grad: bool = False, dtype: Any = torch.float32) -> Any:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _opcheck_cases() -> list[tuple[str, Callable[[], tuple]]]:
    """(op name, sample arguments) for every op; float inputs that autograd covers need grad."""
    rot_cache = ref.rope_cache(16, 8)
    wq, scale = ref.quantize_int8(torch.randn(12, 16))
    w8, w8_scale = ref.quantize_int8(torch.randn(70, 18))
    w8a8 = (*ref.pack_int8_panels(w8), w8_scale)  # panels, sums, scale

    def attention_args() -> tuple:
        kv = (_t(3, 2, 10, 8), _t(3, 2, 10, 8))
        return (_t(2, 4, 8), *kv, torch.tensor([2, 0]), torch.tensor([10, 3]), 0.5)

    def paged_attention_args() -> tuple:
        kv = (_t(5, 2, 4, 8), _t(5, 2, 4, 8))  # 5 blocks of 4 positions
        tables = torch.tensor([[4, 0, 2], [1, 3, 0]])
        return (_t(2, 4, 8), *kv, tables, torch.tensor([10, 3]), 0.5)

    return [
        ("rms_norm", lambda: (_t(3, 16, grad=True), _t(16, grad=True), EPS)),
        ("rms_norm_out", lambda: (_t(3, 16), _t(16), EPS, _t(3, 16))),
        ("rms_norm_backward", lambda: (_t(3, 16), _t(3, 16), _t(16), EPS, _t(3, 16))),
        (
            "fused_add_rms_norm",
            lambda: (_t(3, 16, grad=True), _t(3, 16, grad=True), _t(16, grad=True), EPS),
        ),
        ("fused_add_rms_norm_", lambda: (_t(3, 16), _t(3, 16), _t(16), EPS)),
        ("fused_add_rms_norm_out", lambda: (_t(3, 16), _t(3, 16), _t(16), EPS, _t(3, 16))),
        ("silu_and_mul", lambda: (_t(3, 2, 16, grad=True),)),
        ("silu_and_mul_out", lambda: (_t(3, 16), _t(3, 8))),
        ("silu_and_mul_backward", lambda: (_t(3, 8), _t(3, 16))),
        (
            "rotary_embedding",
            lambda: (
                torch.tensor([1, 5, 9]),
                _t(3, 2, 8, grad=True),
                _t(3, 1, 8, grad=True),
                rot_cache,
                True,
            ),
        ),
        (
            "rotary_embedding_",
            lambda: (torch.tensor([1, 5, 9]), _t(3, 2, 8), _t(3, 1, 8), rot_cache, False),
        ),
        (
            "rotary_embedding_backward",
            lambda: (torch.tensor([1, 5, 9]), _t(3, 2, 8), _t(3, 1, 8), rot_cache, True),
        ),
        ("int8_linear", lambda: (_t(2, 16), wq, scale, _t(12))),
        ("int8_linear_out", lambda: (_t(2, 16), wq, scale, None, _t(2, 12))),
        ("panel_linear", lambda: (_t(3, 16), ref.pack_panels(_t(70, 16)), 70)),
        ("panel_linear_out", lambda: (_t(3, 16), ref.pack_panels(_t(70, 16)), 70, _t(3, 70))),
        ("w8a8_linear", lambda: (_t(3, 18), *w8a8, 70)),
        ("w8a8_linear_out", lambda: (_t(3, 18), *w8a8, 70, _t(3, 70))),
        ("decode_attention", attention_args),
        ("decode_attention_out", lambda: (*attention_args(), _t(2, 4, 8))),
        ("paged_decode_attention", paged_attention_args),
        ("paged_decode_attention_out", lambda: (*paged_attention_args(), _t(2, 4, 8))),
    ]


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize(("name", "make_args"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(kops: Any, name: str, make_args: Callable[[], tuple]) -> None:
    """Schema (mutations declared), fake kernel, autograd registration, AOT dispatch."""
    torch.library.opcheck(getattr(torch.ops.kiln, name).default, make_args())


def test_every_op_is_covered(kops: Any) -> None:
    assert sorted(name for name, _ in OPCHECK_CASES) == sorted(kops.OP_NAMES)


def _double(*shape: int) -> Any:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_rms_norm(kops: Any) -> None:
    assert torch.autograd.gradcheck(
        lambda x, w: torch.ops.kiln.rms_norm(x, w, EPS), (_double(3, 11), _double(11))
    )


def test_gradcheck_fused_add_rms_norm(kops: Any) -> None:
    # both outputs feed the loss, as in a transformer (normed output and the residual stream)
    assert torch.autograd.gradcheck(
        lambda x, r, w: torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS),
        (_double(2, 3, 9), _double(2, 3, 9), _double(9)),
    )


def test_gradcheck_fused_add_rms_norm_unused_residual(kops: Any) -> None:
    assert torch.autograd.gradcheck(
        lambda x, r, w: torch.ops.kiln.fused_add_rms_norm(x, r, w, EPS)[0],
        (_double(4, 9), _double(4, 9), _double(9)),
    )


def test_gradcheck_silu_and_mul(kops: Any) -> None:
    assert torch.autograd.gradcheck(torch.ops.kiln.silu_and_mul, (_double(3, 2, 14),))


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_gradcheck_rotary(kops: Any, is_neox: bool) -> None:
    cache = ref.rope_cache(32, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 31], [7, 7, 1]])
    assert torch.autograd.gradcheck(
        lambda q, k: torch.ops.kiln.rotary_embedding(pos, q, k, cache, is_neox),
        (_double(2, 3, 2, 12), _double(2, 3, 1, 12)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_grads_match_the_reference(kops: Any, dtype: Any) -> None:
    """The kernels' gradients equal autograd through the reference, in the training dtypes."""

    def block(f_norm: Callable, f_silu: Callable, x: Any, r: Any, w: Any) -> Any:
        out, res = f_norm(x, r, w, EPS)
        return (f_silu(torch.cat([out, out * 0.5], dim=-1)) * res).sum()

    def leaves() -> list[Any]:
        torch.manual_seed(0)
        return [torch.randn(*s, dtype=dtype).requires_grad_() for s in [(5, 64), (5, 64), (64,)]]

    ours, theirs = leaves(), leaves()
    block(torch.ops.kiln.fused_add_rms_norm, torch.ops.kiln.silu_and_mul, *ours).backward()
    block(ref.fused_add_rms_norm, ref.silu_and_mul, *theirs).backward()
    tol = {
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.bfloat16: {"atol": 0.1, "rtol": 0.05},
        torch.float16: {"atol": 0.02, "rtol": 0.01},
    }[dtype]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)
