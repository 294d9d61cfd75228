"""The Decoder is serving's choices over the one model: the same blocks, backends chosen at load."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.decoder import Decoder
from modeling.artifact import save_model_dir
from modeling.attention import KernelDecodeAttention, PaddedDecodeAttention
from modeling.config import PRESETS, ModelConfig
from modeling.linear import PanelLinear, RowLinear, row_buckets
from modeling.model import Block, LlamaModel
from modeling.tokenizer import ByteTokenizer

TINY = dataclasses.replace(PRESETS["tiny"], max_seq_len=128)
CPU, FP32 = torch.device("cpu"), torch.float32


def model(cfg: ModelConfig = TINY, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    return m


def kernels_built() -> None:
    from kernels import ops

    if not ops.HAVE_CPU_DECODE_OPS:
        pytest.skip(f"kiln kernels not built: {ops.UNAVAILABLE_REASON}")


def test_training_prefill_decode_and_the_hf_export_run_the_same_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One set of Block modules computes every pass, and their logits agree with each other and
    with transformers' on the exported model."""
    transformers = pytest.importorskip("transformers")
    from training import export_hf

    calls: Counter[tuple[str, int]] = Counter()
    phase = ["training"]
    real = Block.forward

    def counted(self: Block, *args: Any) -> Any:
        calls[(phase[0], id(self))] += 1
        return real(self, *args)

    monkeypatch.setattr(Block, "forward", counted)
    m = model(dataclasses.replace(TINY, tie_embeddings=False))
    blocks = [id(b) for b in m.layers]
    ids = torch.randint(0, 259, (24,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = m(ids.unsqueeze(0))[0]
        save_model_dir(m, ByteTokenizer(), tmp_path / "kiln")
        dec = Decoder(m, slots=4, device=CPU, dtype=FP32)
        phase[0] = "prefill"
        last = dec.prefill(1, ids[:16])
        phase[0] = "decode"
        steps = [dec.decode([1], [p], [int(ids[p])])[0] for p in range(16, 24)]
    for name, count in (("training", 1), ("prefill", 1), ("decode", 8)):
        assert [calls[(name, b)] for b in blocks] == [count] * len(blocks), name
    torch.testing.assert_close(last, full[15], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps), full[16:], rtol=1e-4, atol=1e-4)

    export_hf.export(tmp_path / "kiln", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(ids.unsqueeze(0)).logits[0]
    torch.testing.assert_close(theirs, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["kernel", "padded"])
@pytest.mark.parametrize("tied", [True, False])
def test_each_decode_backend_matches_the_training_model(kind: str, tied: bool) -> None:
    """Prefill in chunks, then decode two sequences in non-adjacent slots (the padded backend
    then attends over a span with an idle slot in it)."""
    if kind == "kernel":
        kernels_built()
    cfg = dataclasses.replace(TINY, tie_embeddings=tied)
    m = model(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 256, (50,), generator=gen), torch.randint(0, 256, (40,), generator=gen)
    buckets = None if kind == "kernel" else row_buckets(4)
    with torch.inference_mode():
        want_a, want_b = m(a.unsqueeze(0))[0], m(b.unsqueeze(0))[0]
        dec = Decoder(m, slots=4, device=CPU, dtype=FP32, buckets=buckets)
        assert dec.attention_kernel is (kind == "kernel")
        dec.prefill(1, a[:7])
        dec.prefill(1, a[7:20], start=7)
        dec.prefill(3, b[:10])
        for step in range(20):
            pa, pb = 20 + step, 10 + step
            logits = dec.decode([1, 3], [pa, pb], [int(a[pa]), int(b[pb])])
            torch.testing.assert_close(logits[0], want_a[pa], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[1], want_b[pb], rtol=1e-4, atol=1e-4)


def test_backends_and_projections_are_chosen_at_load() -> None:
    kernels_built()
    with torch.inference_mode():
        dec = Decoder(model(), slots=8, device=CPU, dtype=FP32)
        assert isinstance(dec._decode, KernelDecodeAttention) and dec.buckets == []
        linears = dec.decode_linears.by_module
        assert all(isinstance(impl, PanelLinear) for impl in linears.values())
        # Every projection of every layer, and the (tied) head: the embedding.
        assert len(linears) == 4 * TINY.num_layers + 1
        assert dec.model.embed_tokens in linears

        padded = Decoder(model(), slots=8, device=CPU, dtype=FP32, buckets=[2, 8])
        assert isinstance(padded._decode, PaddedDecodeAttention) and padded.buckets == [2, 8]
        assert all(isinstance(impl, RowLinear) for impl in padded.decode_linears.by_module.values())


def test_a_decode_step_writes_only_its_own_cache_rows() -> None:
    with torch.inference_mode():
        dec = Decoder(model(), slots=4, device=CPU, dtype=FP32)
        for slot in range(4):
            dec.prefill(slot, torch.arange(5 + slot))
        before = [kv.clone() for kv in dec.cache.kv]
        dec.decode([0, 2], [5, 7], [1, 2])
        for layer, kv in enumerate(dec.cache.kv):
            changed = (kv != before[layer]).any(dim=-1)  # [2, blocks, heads, rows]
            # Slot s's fixed table starts at block s * n; positions 5 and 7 are in its first.
            n = dec.blocks_per_seq
            assert changed.nonzero()[:, [1, 3]].unique(dim=0).tolist() == [[0, 5], [2 * n, 7]]
