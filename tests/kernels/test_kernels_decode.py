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


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13])
@pytest.mark.parametrize("n_k", [(1, 3), (31, 17), (100, 33), (130, 64), (257, 129)], ids=str)
def test_bfloat16_panels_give_the_bits_of_float32_panels_of_the_same_values(
    kops: Any, cpu_variant: str, m: int, n_k: tuple[int, int]
) -> None:
    """bfloat16 panels are widened two vectors at a time, even and odd columns apart, and put
    back in order once per tile: each output must still be the very chain of multiply-adds that
    float32 panels holding the same values compute (bit for bit, every column, partial tiles)."""
    n, k = n_k
    x = randn(m, k, seed=21)
    w = randn(n, k, seed=22).bfloat16()
    got = torch.ops.kiln.panel_linear(x, ref.pack_panels(w), n)
    want = torch.ops.kiln.panel_linear(x, ref.pack_panels(w.float()), n)
    assert torch.equal(got, want)


def test_opcheck_with_bfloat16_panels(kops: Any) -> None:
    """Registration with the bfloat16 weights serving uses (the shared opcheck uses float32)."""
    panels = ref.pack_panels(randn(70, 16, seed=23).bfloat16())
    torch.library.opcheck(torch.ops.kiln.panel_linear.default, (randn(3, 16, seed=24), panels, 70))
    out = torch.empty(3, 70)
    args = (randn(3, 16, seed=24), panels, 70, out)
    torch.library.opcheck(torch.ops.kiln.panel_linear_out.default, args)


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
# paged_decode_attention


def paged(
    k: Any, v: Any, slots: list[int], lengths: list[int], block: int, seed: int = 11
) -> tuple[Any, Any, Any]:
    """The contiguous caches' slots scattered over shuffled blocks of `block` positions: the
    paged caches and each sequence's block table."""
    n_slots, heads, max_len, d = k.shape
    per_seq = -(-max_len // block)
    order = torch.randperm(n_slots * per_seq + 3, generator=torch.Generator().manual_seed(seed))
    pk = randn(len(order), heads, block, d, seed=seed)  # unused blocks hold noise
    pv = randn(len(order), heads, block, d, seed=seed + 1)
    tables = []
    for b, slot in enumerate(slots):
        table = order[b * per_seq : (b + 1) * per_seq]
        for i, blk in enumerate(table.tolist()):
            span = k[slot, :, i * block : (i + 1) * block].shape[1]
            pk[blk, :, :span] = k[slot, :, i * block : (i + 1) * block]
            pv[blk, :, :span] = v[slot, :, i * block : (i + 1) * block]
        tables.append(table)
    return pk, pv, torch.stack(tables)


@pytest.mark.parametrize("d", [8, 32, 64, 128, 48])
@pytest.mark.parametrize("block", [4, 16, 5])  # 5: the four-position groups straddle blocks
def test_paged_decode_attention_matches_the_reference(
    kops: Any, cpu_variant: str, d: int, block: int
) -> None:
    k, v = cache(4, 2, 40, d)
    slots, lengths = [2, 0, 3], [1, 17, 40]
    q = randn(3, 6, d, seed=8)
    pk, pv, tables = paged(k, v, slots, lengths, block)
    lengths_t = torch.tensor(lengths)
    got = torch.ops.kiln.paged_decode_attention(q, pk, pv, tables, lengths_t, 0.3)
    want = ref.paged_decode_attention(q, pk, pv, tables, lengths_t, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        want, ref.decode_attention(q, k, v, torch.tensor(slots), lengths_t, 0.3)
    )
    out = torch.empty(6, 3, d).transpose(0, 1)  # strided out: computed aside, copied in
    torch.ops.kiln.paged_decode_attention_out(q, pk, pv, tables, lengths_t, 0.3, out)
    assert torch.equal(out, got)


@pytest.mark.parametrize("block", [4, 16])
def test_paged_decode_attention_is_bitwise_the_contiguous_kernel(
    kops: Any, cpu_variant: str, block: int
) -> None:
    """Blocks a multiple of 4 positions: the same sums in the same order as the contiguous
    cache, so paging changes no bit of the result (greedy output stays what it was)."""
    k, v = cache(5, 2, 64, 64)
    slots, lengths = [4, 1, 0, 2], [64, 1, 33, 50]
    q = randn(4, 8, 64, seed=9)
    pk, pv, tables = paged(k, v, slots, lengths, block)
    lengths_t = torch.tensor(lengths)
    want = torch.ops.kiln.decode_attention(q, k, v, torch.tensor(slots), lengths_t, 0.125)
    got = torch.ops.kiln.paged_decode_attention(q, pk, pv, tables, lengths_t, 0.125)
    assert torch.equal(got, want)


def test_paged_decode_attention_is_batch_invariant(kops: Any, cpu_variant: str) -> None:
    k, v = cache(8, 2, 48, 32)
    slots = list(range(8))
    lengths = [48, 3, 17, 1, 30, 48, 9, 22]
    q = randn(8, 4, 32, seed=12)
    pk, pv, tables = paged(k, v, slots, lengths, 16)
    together = torch.ops.kiln.paged_decode_attention(q, pk, pv, tables, torch.tensor(lengths), 1.0)
    for b in range(8):
        alone = torch.ops.kiln.paged_decode_attention(
            q[b : b + 1], pk, pv, tables[b : b + 1], torch.tensor(lengths[b : b + 1]), 1.0
        )
        assert torch.equal(alone[0], together[b]), b


def test_paged_decode_attention_reads_only_its_own_blocks(kops: Any) -> None:
    k, v = cache(2, 2, 32, 16)
    pk, pv, tables = paged(k, v, [0, 1], [20, 32], 8)
    q, lengths = randn(2, 2, 16, seed=13), torch.tensor([20, 32])
    before = torch.ops.kiln.paged_decode_attention(q, pk, pv, tables, lengths, 1.0)
    listed = set(tables[0, :3].tolist()) | set(tables[1].tolist())
    for blk in range(pk.shape[0]):
        if blk not in listed:
            pk[blk] = pv[blk] = float("nan")
    pk[tables[0, 2], :, 4:] = float("nan")  # past sequence 0's length in its last block
    tables[0, 3:] = 10**6  # table entries past the length are not read either
    after = torch.ops.kiln.paged_decode_attention(q, pk, pv, tables, lengths, 1.0)
    assert torch.equal(after, before)


def _paged(**override: Any) -> Callable[[], Any]:
    kv = randn(2, 6, 2, 4, 8)
    args = {
        "q": randn(2, 4, 8),
        "k": kv[0],
        "v": kv[1],
        "tables": torch.tensor([[0, 1, 2], [5, 4, 3]]),
        "lengths": torch.tensor([1, 12]),
    }
    args.update(override)
    return lambda: torch.ops.kiln.paged_decode_attention(
        args["q"], args["k"], args["v"], args["tables"], args["lengths"], 1.0
    )


PAGED_ERRORS: list[tuple[str, Callable[[], Any], str]] = [
    ("length past the table", _paged(lengths=torch.tensor([1, 13])), r"lengths\[1\] = 13"),
    ("block id", _paged(tables=torch.tensor([[0, 1, 2], [5, 6, 3]])), r"\[1, 1\] = 6 is outside"),
    ("table shape", _paged(tables=torch.tensor([0, 5])), "block_tables must be"),
    ("int32 tables", _paged(tables=torch.zeros(2, 3, dtype=torch.int32)), "must be int64"),
]


@pytest.mark.parametrize(("name", "call", "match"), PAGED_ERRORS, ids=[c[0] for c in PAGED_ERRORS])
def test_paged_errors_are_clear(kops: Any, name: str, call: Callable[[], Any], match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        call()


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
