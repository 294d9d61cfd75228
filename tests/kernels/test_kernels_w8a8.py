"""w8a8_linear (int8 activations x int8 weights, exact int32 sums): bit for bit its reference on
every CPU variant (and on AVX-512 with and without VNNI), batch invariance, layouts, errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402


def randn(*shape: int, seed: int = 0) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def packed(n: int, k: int, seed: int = 2) -> tuple[Any, Any, Any]:
    """(panels, sums, scale) of a random [n, k] weight quantized per output channel."""
    q, scale = ref.quantize_int8(randn(n, k, seed=seed))
    panels, sums = ref.pack_int8_panels(q)
    return panels, sums, scale


@pytest.fixture(params=["amx_int8", "avx512_vnni", "avx512", "avx2", "generic"])
def int8_path(request: pytest.FixtureRequest, kops: Any) -> Iterator[str]:
    """Every CPU variant; for avx512, also on AMX and on VNNI where the CPU has them."""
    name = request.param
    variant = "avx512" if name in kops.INT8_LEVELS else name
    if variant not in kops.cpu_isas():
        pytest.skip(f"this build or CPU has no {variant} variant (it has {kops.cpu_isas()})")
    with kops.use_cpu_isa(variant), kops.use_int8_isa(name if variant != name else "variant"):
        if kops.cpu_int8_isa() != name:
            pytest.skip(f"this CPU has no {name}")
        yield name


def test_pack_int8_panels_round_trips_and_sums() -> None:
    q, _ = ref.quantize_int8(randn(130, 7))
    panels, sums = ref.pack_int8_panels(q)
    assert panels.shape == (3, 2, 64, 4)
    assert torch.equal(ref.unpack_int8_panels(panels, 130, 7), q)
    assert torch.equal(sums, q.sum(1, dtype=torch.int32))
    assert torch.count_nonzero(panels[2, :, 2:]) == 0  # zero past the last feature
    assert torch.count_nonzero(panels[:, 1, :, 3]) == 0  # and past the last input


def test_pack_int8_panels_refuses_minus_128() -> None:
    w = torch.zeros(3, 4, dtype=torch.int8)
    w[1, 2] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        ref.pack_int8_panels(w)
    with pytest.raises(ValueError, match="int8"):
        ref.pack_int8_panels(w.float())


def test_quantize_rows_int8() -> None:
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 2.9]])
    q, scale = ref.quantize_rows_int8(x)
    assert q.dtype == torch.int8
    assert q[0].tolist() == [64, -127, 32, 0]  # 63.5 rounds half to even: 64
    assert q[1].tolist() == [0, 0, 0, 0] and scale[1] == 0
    assert q[2, 0] == 127 and scale[2] == pytest.approx(3.0 / 127)


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 32, 33])
@pytest.mark.parametrize("n_k", [(1, 1), (64, 4), (70, 13), (130, 97), (257, 1000)], ids=str)
def test_w8a8_linear_is_its_reference_bit_for_bit(
    kops: Any, int8_path: str, m: int, n_k: tuple[int, int]
) -> None:
    n, k = n_k
    panels, sums, scale = packed(n, k)
    x = randn(m, k, seed=m) * 3
    want = ref.w8a8_linear(x, panels, sums, scale, n)
    got = torch.ops.kiln.w8a8_linear(x, panels, sums, scale, n)
    assert torch.equal(got, want), (int8_path, float((got - want).abs().max()))
    out = torch.empty(m, n)
    torch.ops.kiln.w8a8_linear_out(x, panels, sums, scale, n, out)
    assert torch.equal(out, want)


def test_w8a8_linear_is_close_to_the_float_product(kops: Any) -> None:
    """Per-row int8 activations: about 1% of the outputs' spread from x @ w.T in float32."""
    n, k = 300, 960
    q, scale = ref.quantize_int8(randn(n, k, seed=3))
    panels, sums = ref.pack_int8_panels(q)
    x = randn(8, k, seed=4)
    dense = x @ (q.float() * scale[:, None]).t()
    got = torch.ops.kiln.w8a8_linear(x, panels, sums, scale, n)
    assert float((got - dense).abs().max()) < 0.02 * float(dense.std()) * 6


def test_w8a8_linear_zero_rows_and_extreme_values(kops: Any) -> None:
    panels, sums, scale = packed(70, 33)
    x = torch.zeros(3, 33)
    x[1] = 1e30
    x[2, 5] = -1e-30  # a lone tiny value still quantizes to -127
    got = torch.ops.kiln.w8a8_linear(x, panels, sums, scale, 70)
    assert torch.equal(got[0], torch.zeros(70))
    assert torch.equal(got, ref.w8a8_linear(x, panels, sums, scale, 70))


def test_w8a8_linear_keeps_leading_dims_and_reads_strided_x(kops: Any) -> None:
    panels, sums, scale = packed(70, 33)
    x = randn(2, 3, 66, seed=1)[..., ::2]  # non-contiguous last dimension
    got = torch.ops.kiln.w8a8_linear(x, panels, sums, scale, 70)
    assert got.shape == (2, 3, 70)
    assert torch.equal(got, ref.w8a8_linear(x.contiguous(), panels, sums, scale, 70))
    rows = randn(5, 40, seed=2)[:, 3:36]  # rows with a stride past K
    assert torch.equal(
        torch.ops.kiln.w8a8_linear(rows, panels, sums, scale, 70),
        ref.w8a8_linear(rows, panels, sums, scale, 70),
    )


def test_w8a8_linear_out_writes_into_any_layout(kops: Any) -> None:
    panels, sums, scale = packed(70, 16)
    x = randn(3, 16, seed=1)
    want = torch.ops.kiln.w8a8_linear(x, panels, sums, scale, 70)
    strided = torch.empty(70, 3).t()  # transposed: the kernel writes a copy back
    torch.ops.kiln.w8a8_linear_out(x, panels, sums, scale, 70, strided)
    assert torch.equal(strided, want)


@pytest.mark.parametrize("n_k", [(96, 40), (1408, 256), (257, 129)], ids=str)
def test_w8a8_linear_is_batch_invariant(kops: Any, int8_path: str, n_k: tuple[int, int]) -> None:
    """A row's output is bitwise the same alone or at any place among any number of rows."""
    n, k = n_k
    panels, sums, scale = packed(n, k, seed=5)
    probe = randn(1, k, seed=6)
    alone = torch.ops.kiln.w8a8_linear(probe, panels, sums, scale, n)[0]
    for rows in (2, 3, 5, 6, 7, 8, 12, 13, 31, 32, 64):
        for place in {0, rows // 2, rows - 1}:
            batch = randn(rows, k, seed=rows) * (rows % 5 + 1)
            batch[place] = probe[0]
            got = torch.ops.kiln.w8a8_linear(batch, panels, sums, scale, n)[place]
            assert torch.equal(got, alone), (rows, place)


def test_w8a8_linear_is_the_same_on_every_variant(kops: Any) -> None:
    panels, sums, scale = packed(200, 333)
    x = randn(9, 333, seed=8)
    results = []
    for isa in kops.cpu_isas():
        for int8 in kops.INT8_LEVELS:
            with kops.use_cpu_isa(isa), kops.use_int8_isa(int8):
                results.append(torch.ops.kiln.w8a8_linear(x, panels, sums, scale, 200))
    assert all(torch.equal(r, results[0]) for r in results)


def test_w8a8_linear_compiles(kops: Any) -> None:
    panels, sums, scale = packed(70, 16)
    x = randn(3, 16, seed=1)

    def f(x: Any) -> Any:
        return torch.ops.kiln.w8a8_linear(x, panels, sums, scale, 70) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda p, s, c: (torch.randn(2, 16).double(), p, s, c, 70), "x must be float32"),
        (lambda p, s, c: (torch.randn(2, 16), p.float(), s, c, 70), "weight_panels must be int8"),
        (lambda p, s, c: (torch.randn(2, 20), p, s, c, 70), r"ceil\(K / 4\)"),
        (lambda p, s, c: (torch.randn(2, 16), p, s, c, 200), "output features"),
        (lambda p, s, c: (torch.randn(2, 16), p, s.long(), c, 70), "weight_sums must be int32"),
        (lambda p, s, c: (torch.randn(2, 16), p, s, c[:5], 70), "scale must be float32"),
    ],
    ids=["x dtype", "panel dtype", "K", "out_features", "sums", "scale"],
)
def test_w8a8_linear_errors_name_the_argument(kops: Any, args: Any, message: str) -> None:
    panels, sums, scale = packed(70, 16)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kiln.w8a8_linear(*args(panels, sums, scale))


def test_w8a8_linear_out_refuses_a_wrong_out(kops: Any) -> None:
    panels, sums, scale = packed(70, 16)
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.kiln.w8a8_linear_out(
            torch.randn(2, 16), panels, sums, scale, 70, torch.empty(2, 71)
        )


def test_ops_face_falls_back_for_other_dtypes(kops: Any) -> None:
    """kernels.ops.w8a8_linear sends non-float32 input to the reference."""
    panels, sums, scale = packed(70, 16)
    x = randn(2, 16, seed=3).double()
    got = kops.w8a8_linear(x, panels, sums, scale, 70)
    assert got.shape == (2, 70)
