"""The CPU decode ops: panel_linear and decode_attention against their references, their batch
invariance (bitwise), and clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the kernel tests need torch (the `ml` extra)")

from kernels import reference as ref  # noqa: E402


def randn(*shape: int, seed: int = 0) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# panel_linear


def test_pack_panels_round_trips() -> None:
    w = randn(130, 7)
    panels = ref.pack_panels(w)
    assert panels.shape == (3, 7, 64)
    assert torch.equal(ref.unpack_panels(panels, 130), w)
    assert torch.count_nonzero(panels[2, :, 2:]) == 0  # zero past the last feature


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 13, 32])
@pytest.mark.parametrize("n_k", [(1, 1), (64, 256), (100, 33), (130, 1000), (320, 64)], ids=str)
def test_panel_linear_matches_the_reference(
    kops: Any, cpu_variant: str, m: int, n_k: tuple[int, int]
) -> None:
    n, k = n_k
    x, w = randn(m, k, seed=1), randn(n, k, seed=2)
    got = torch.ops.kiln.panel_linear(x, ref.pack_panels(w), n)
    assert got.shape == (m, n) and got.is_contiguous()
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-4)


def test_panel_linear_keeps_leading_dims_and_reads_strided_x(kops: Any) -> None:
    w = randn(70, 48, seed=3)
    x = randn(2, 3, 96, seed=4)[:, :, ::2]  # a column-strided input is copied, not misread
    got = torch.ops.kiln.panel_linear(x, ref.pack_panels(w), 70)
    assert got.shape == (2, 3, 70)
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-4)


def test_panel_linear_out_writes_into_any_layout(kops: Any, cpu_variant: str) -> None:
    x, w = randn(5, 40, seed=14), randn(70, 40, seed=15)
    panels = ref.pack_panels(w)
    want = torch.ops.kiln.panel_linear(x, panels, 70)
    out = torch.empty(5, 70)
    torch.ops.kiln.panel_linear_out(x, panels, 70, out)
    assert torch.equal(out, want)
    strided = torch.empty(70, 5).t()  # not contiguous: computed aside, then copied in
    torch.ops.kiln.panel_linear_out(x, panels, 70, strided)
    assert torch.equal(strided, want)


@pytest.mark.parametrize("n_k", [(96, 40), (1408, 256), (257, 129)], ids=str)
def test_panel_linear_is_batch_invariant(kops: Any, cpu_variant: str, n_k: tuple[int, int]) -> None:
    """A row's output is bitwise the same alone or at any place among any number of rows."""
    n, k = n_k
    panels = ref.pack_panels(randn(n, k, seed=5))
    probe = randn(1, k, seed=6)
    alone = torch.ops.kiln.panel_linear(probe, panels, n)[0]
    for rows in (2, 3, 4, 5, 6, 7, 8, 12, 13, 31, 32, 64):
        for place in {0, rows // 2, rows - 1}:
            batch = randn(rows, k, seed=rows)
            batch[place] = probe[0]
            assert torch.equal(torch.ops.kiln.panel_linear(batch, panels, n)[place], alone), (
                rows,
                place,
            )


def _weights_as(w: Any, wtype: str) -> tuple[Any, Any, Any]:
    """(panels, scale, the weight they hold in float32) for float32, bfloat16 or int8 weights."""
    if wtype == "int8":
        q, scale = ref.quantize_int8(w)
        return ref.pack_panels(q), scale, q.float() * scale[:, None]
    cast = w.to(getattr(torch, wtype))
    return ref.pack_panels(cast), None, cast.float()


@pytest.mark.parametrize("wtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("m", [1, 5, 6, 13])
@pytest.mark.parametrize("n_k", [(1, 1), (100, 33), (130, 1000)], ids=str)
def test_panel_linear_with_narrow_weights_matches_the_reference(
    kops: Any, cpu_variant: str, wtype: str, m: int, n_k: tuple[int, int]
) -> None:
    """bfloat16 and int8 panels: converted to float32 exactly, summed as float32 panels are."""
    n, k = n_k
    x = randn(m, k, seed=1)
    panels, scale, dense = _weights_as(randn(n, k, seed=2), wtype)
    got = torch.ops.kiln.panel_linear(x, panels, n, scale)
    torch.testing.assert_close(got, x @ dense.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, ref.panel_linear(x, panels, n, scale), atol=1e-4, rtol=1e-4)
    out = torch.empty(m, n)
    torch.ops.kiln.panel_linear_out(x, panels, n, out, scale)
    assert torch.equal(out, got)


@pytest.mark.parametrize("wtype", ["bfloat16", "int8"])
def test_panel_linear_with_narrow_weights_is_batch_invariant(
    kops: Any, cpu_variant: str, wtype: str
) -> None:
    n, k = 257, 129
    panels, scale, _ = _weights_as(randn(n, k, seed=5), wtype)
    probe = randn(1, k, seed=6)
    alone = torch.ops.kiln.panel_linear(probe, panels, n, scale)[0]
    for rows in (2, 3, 6, 7, 13, 32):
        for place in {0, rows // 2, rows - 1}:
            batch = randn(rows, k, seed=rows)
            batch[place] = probe[0]
            got = torch.ops.kiln.panel_linear(batch, panels, n, scale)[place]
            assert torch.equal(got, alone), (rows, place)


# ---------------------------------------------------------------------------------------------
# decode_attention


def cache(slots: int, kv_heads: int, max_len: int, d: int, seed: int = 7) -> tuple[Any, Any]:
    kv = randn(2, slots, kv_heads, max_len, d, seed=seed)
    return kv[0], kv[1]  # views of one tensor, as the decoder keeps them


@pytest.mark.parametrize("d", [8, 32, 64, 128, 48])  # 48: no specialized head size
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)], ids=str)
def test_decode_attention_matches_the_reference(
    kops: Any, cpu_variant: str, d: int, heads: int, kv_heads: int
) -> None:
    k, v = cache(6, kv_heads, 50, d)
    q = randn(4, heads, d, seed=8)
    slots = torch.tensor([5, 0, 3, 2])
    lengths = torch.tensor([1, 50, 17, 33])
    got = torch.ops.kiln.decode_attention(q, k, v, slots, lengths, 0.3)
    want = ref.decode_attention(q, k, v, slots, lengths, 0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # A query that is a view into a wider projection output (the decoder's q) reads the same.
    qkv = torch.cat([q, randn(4, 2, d, seed=9)], dim=1)
    got_view = torch.ops.kiln.decode_attention(qkv[:, :heads], k, v, slots, lengths, 0.3)
    assert torch.equal(got_view, got)


def test_decode_attention_out_matches_the_functional_form(kops: Any, cpu_variant: str) -> None:
    k, v = cache(4, 2, 30, 32)
    q = randn(3, 4, 32, seed=16)
    slots, lengths = torch.tensor([3, 1, 0]), torch.tensor([30, 1, 7])
    want = torch.ops.kiln.decode_attention(q, k, v, slots, lengths, 0.7)
    out = torch.empty(3, 4, 32)
    torch.ops.kiln.decode_attention_out(q, k, v, slots, lengths, 0.7, out)
    assert torch.equal(out, want)
    strided = torch.empty(32, 4, 3).permute(2, 1, 0)
    torch.ops.kiln.decode_attention_out(q, k, v, slots, lengths, 0.7, strided)
    assert torch.equal(strided, want)


def test_decode_attention_is_batch_invariant(kops: Any, cpu_variant: str) -> None:
    k, v = cache(32, 4, 300, 32)
    q = randn(32, 8, 32, seed=10)
    lengths = torch.randint(1, 301, (32,), generator=torch.Generator().manual_seed(11))
    slots = torch.randperm(32, generator=torch.Generator().manual_seed(12))
    together = torch.ops.kiln.decode_attention(q, k, v, slots, lengths, 1.0)
    for b in (0, 13, 31):
        alone = torch.ops.kiln.decode_attention(
            q[b : b + 1], k, v, slots[b : b + 1], lengths[b : b + 1], 1.0
        )
        assert torch.equal(alone[0], together[b])


def test_decode_attention_is_not_swayed_by_positions_past_the_length(kops: Any) -> None:
    k, v = cache(2, 2, 40, 32)
    q = randn(1, 4, 32, seed=13)
    slots, lengths = torch.tensor([1]), torch.tensor([20])
    before = torch.ops.kiln.decode_attention(q, k, v, slots, lengths, 1.0)
    k[1, :, 20:] = 1e4  # would dominate every score if it were read
    v[1, :, 20:] = float("nan")
    assert torch.equal(torch.ops.kiln.decode_attention(q, k, v, slots, lengths, 1.0), before)


# ---------------------------------------------------------------------------------------------
# clear errors


def _attention(**override: Any) -> Callable[[], Any]:
    k, v = cache(4, 2, 16, 8)
    args = {
        "q": randn(2, 4, 8),
        "k": k,
        "v": v,
        "slots": torch.tensor([0, 3]),
        "lengths": torch.tensor([1, 16]),
    }
    args.update(override)
    return lambda: torch.ops.kiln.decode_attention(
        args["q"], args["k"], args["v"], args["slots"], args["lengths"], 1.0
    )


ERROR_CASES: list[tuple[str, Callable[[], Any], str]] = [
    (
        "panel dtype",
        lambda: torch.ops.kiln.panel_linear(
            randn(2, 8).double(), ref.pack_panels(randn(4, 8)).double(), 4
        ),
        "x must be float32",
    ),
    (
        "panel weight dtype",
        lambda: torch.ops.kiln.panel_linear(randn(2, 8), ref.pack_panels(randn(4, 8)).half(), 4),
        "weight_panels must be float32, bfloat16 or int8",
    ),
    (
        "int8 panels without a scale",
        lambda: torch.ops.kiln.panel_linear(
            randn(2, 8), ref.pack_panels(ref.quantize_int8(randn(4, 8))[0]), 4
        ),
        "int8 weight_panels need a scale",
    ),
    (
        "panel scale shape",
        lambda: torch.ops.kiln.panel_linear(
            randn(2, 8), ref.pack_panels(ref.quantize_int8(randn(4, 8))[0]), 4, torch.ones(5)
        ),
        r"scale must be float32 \[4\]",
    ),
    (
        "panel layout",
        lambda: torch.ops.kiln.panel_linear(randn(2, 8), randn(4, 8), 4),
        r"weight_panels must be \[panels, 8",
    ),
    (
        "panel out_features",
        lambda: torch.ops.kiln.panel_linear(randn(2, 8), ref.pack_panels(randn(4, 8)), 65),
        "1 panels hold 1 to 64 output features, got out_features=65",
    ),
    ("attention length", _attention(lengths=torch.tensor([1, 17])), r"lengths\[1\] = 17"),
    ("attention empty length", _attention(lengths=torch.tensor([0, 1])), r"lengths\[0\] = 0"),
    ("attention slot", _attention(slots=torch.tensor([0, 4])), r"slots\[1\] = 4 is outside"),
    ("attention groups", _attention(q=randn(2, 3, 8)), r"query heads \(3\) must be a multiple"),
    ("attention head size", _attention(q=randn(2, 4, 6)), "must both be"),
    (
        "attention int32 slots",
        _attention(slots=torch.tensor([0, 1], dtype=torch.int32)),
        "slots and lengths must be int64",
    ),
    ("attention batch", _attention(lengths=torch.tensor([1])), r"must be \[2\]"),
    (
        "panel out shape",
        lambda: torch.ops.kiln.panel_linear_out(
            randn(2, 8), ref.pack_panels(randn(4, 8)), 4, randn(2, 5)
        ),
        r"out must have shape \[2, 4\]",
    ),
    (
        "panel out aliases x",
        lambda: (lambda t: torch.ops.kiln.panel_linear_out(t, ref.pack_panels(randn(8, 8)), 8, t))(
            randn(2, 8)
        ),
        "overlap in memory",
    ),
    (
        "attention out dtype",
        lambda: (
            lambda k, v: torch.ops.kiln.decode_attention_out(
                randn(1, 2, 8),
                k,
                v,
                torch.tensor([0]),
                torch.tensor([3]),
                1.0,
                randn(1, 2, 8).double(),
            )
        )(*cache(1, 1, 4, 8)),
        "out must be float32",
    ),
]


@pytest.mark.parametrize(("name", "call", "match"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_are_clear(kops: Any, name: str, call: Callable[[], Any], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# the Python wrappers: the compiled ops on CPU float32, the references elsewhere


def test_wrappers_use_the_reference_off_cpu_float32(kops: Any) -> None:
    w = randn(10, 6).double()
    x = randn(3, 6).double()
    torch.testing.assert_close(kops.panel_linear(x, ref.pack_panels(w), 10), x @ w.T)
    k, v = cache(2, 1, 5, 4)
    q, slots, lengths = randn(1, 2, 4).double(), torch.tensor([1]), torch.tensor([5])
    got = kops.decode_attention(q, k.double(), v.double(), slots, lengths, 1.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(
        got, ref.decode_attention(q, k.double(), v.double(), slots, lengths, 1.0)
    )
