"""The engine in-process: the KV-cache decoder against the shared model, invariance, sampling."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch

from inference.decoder import Decoder, PanelLinear, RowLinear, row_buckets
from inference.engine import EngineSettings, running_engine
from inference.sampling import greedy, sample
from inference.scheduler import QueueFullError
from inference.sequence import FinishReason, SamplingParams, Sequence
from inference.serve import build_parser
from modeling.config import ModelConfig
from modeling.model import LlamaModel
from tests.inference.support import TINY, write_model


def model(cfg: ModelConfig, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("tied", [True, False])
def test_prefill_and_decode_match_the_training_model(tied: bool) -> None:
    cfg = dataclasses.replace(TINY, tie_embeddings=tied, max_seq_len=128)
    m = model(cfg)
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = m(ids.unsqueeze(0))[0]
        dec = Decoder(m, slots=4, device=torch.device("cpu"), dtype=torch.float32)
        # Prefill 30 tokens in two chunks into slot 2, then decode one token at a time.
        dec.prefill(2, ids[:20])
        last = dec.prefill(2, ids[20:30], start=20)
        torch.testing.assert_close(last, full[29], rtol=1e-4, atol=1e-4)
        for pos in range(30, 60):
            logits = dec.decode([2], [pos], [int(ids[pos])])
            torch.testing.assert_close(logits[0], full[pos], rtol=1e-4, atol=1e-4)


def decode_linears(kind: str) -> list[int] | None:
    """The Decoder's `buckets` for kiln's panel_linear (None) or padded MKL GEMMs."""
    if kind == "panels":
        from kernels import ops

        if not ops.HAVE_CPU_DECODE_OPS:
            pytest.skip(f"kiln kernels not built: {ops.UNAVAILABLE_REASON}")
        return None
    return row_buckets(32)


@pytest.mark.parametrize("kind", ["panels", "padded"])
def test_a_rows_logits_do_not_depend_on_its_batch(kind: str) -> None:
    """Bitwise: alone in slot 0, or in slot 5 among up to 31 others of other lengths."""
    cfg = dataclasses.replace(TINY, max_seq_len=512)
    gen = torch.Generator().manual_seed(2)
    buckets = decode_linears(kind)
    with torch.inference_mode():
        dec = Decoder(
            model(cfg), slots=32, device=torch.device("cpu"), dtype=torch.float32, buckets=buckets
        )
        assert dec.check_invariance()
        assert isinstance(dec.head_rows, PanelLinear if kind == "panels" else RowLinear)
        prompt = torch.randint(0, 256, (40,), generator=gen)
        dec.prefill(0, prompt[:39])
        alone = dec.decode([0], [39], [int(prompt[39])])[0]
        for batch in (2, 7, 8, 9, 31, 32):
            slots = list(range(batch))
            lengths = torch.randint(1, 400, (batch,), generator=gen).tolist()
            target = 5 % batch
            for s, n in zip(slots, lengths, strict=True):
                if s != target:
                    dec.prefill(s, torch.randint(0, 256, (n,), generator=gen))
            dec.prefill(target, prompt[:39])
            lengths[target] = 39
            tokens = torch.randint(0, 256, (batch,), generator=gen)
            tokens[target] = prompt[39]
            logits = dec.decode(slots, lengths, tokens.tolist())
            assert torch.equal(logits[target], alone), f"differs in a batch of {batch}"


def test_row_linear_is_exact_and_position_independent() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 40, generator=gen)
    linear = RowLinear(weight, [2, 8, 32])
    x = torch.randn(32, 40, generator=gen)
    for rows in (1, 3, 8, 9, 32):
        torch.testing.assert_close(linear(x[:rows]), x[:rows] @ weight.T)
    # At one padded row count a row's result ignores its position and neighbours on any CPU;
    # whether row counts agree with each other depends on the CPU (the decoder's test below).
    for rows in (2, 8, 32):
        assert RowLinear(weight, [rows]).check_invariance(), rows


def test_row_buckets() -> None:
    assert row_buckets(32) == [2, 8, 32]
    assert row_buckets(32, smallest=4) == [4, 16, 32]
    assert row_buckets(8, smallest=8) == [8]
    assert row_buckets(1) == [2]


def test_decoder_drops_row_counts_that_sum_another_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on AMD EPYC, where MKL's packed GEMM sums 2-3 rows one way and 4 or more another."""
    real = RowLinear.check_invariance

    def two_rows_differ(self: RowLinear) -> bool:
        return real(self) and self.buckets[0] >= 4

    monkeypatch.setattr(RowLinear, "check_invariance", two_rows_differ)
    cpu, fp32 = torch.device("cpu"), torch.float32
    with torch.inference_mode():
        dec = Decoder(model(TINY), slots=32, device=cpu, dtype=fp32, buckets=row_buckets(32))
        assert dec.check_invariance()
        assert dec.buckets == [4, 16, 32]
        assert dec.head_rows.buckets == [4, 16, 32]

    monkeypatch.setattr(RowLinear, "check_invariance", lambda self: False)
    with torch.inference_mode():
        dec = Decoder(model(TINY), slots=32, device=cpu, dtype=fp32, buckets=row_buckets(32))
        assert not dec.check_invariance()
        assert dec.buckets == [32]  # one row count for every step, and still not invariant


def test_decoder_pads_row_counts_if_panels_were_not_invariant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decode_linears("panels")
    monkeypatch.setattr(PanelLinear, "check_invariance", lambda self: False)
    with torch.inference_mode():
        dec = Decoder(model(TINY), slots=32, device=torch.device("cpu"), dtype=torch.float32)
        assert isinstance(dec.head_rows, PanelLinear) and dec.buckets == []
        assert dec.check_invariance()  # on the padded MKL GEMMs
        assert isinstance(dec.head_rows, RowLinear) and dec.buckets


def test_sampling_rows_are_independent_and_seeded() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 50, generator=gen)

    def draw(rows: list[int], seed: int) -> list[int]:
        return sample(
            logits[rows],
            temperatures=[0.8] * len(rows),
            top_ks=[20] * len(rows),
            top_ps=[0.9] * len(rows),
            generators=[torch.Generator().manual_seed(seed + r) for r in rows],
        )

    together = draw(list(range(6)), 10)
    assert [draw([r], 10)[0] for r in range(6)] == together
    assert draw(list(range(6)), 10) == together
    # top_k=1, or a tiny top_p, leaves only the best token: sampling becomes greedy.
    for top_k, top_p in ((1, None), (None, 1e-6)):
        picked = sample(
            logits,
            temperatures=[1.0] * 6,
            top_ks=[top_k] * 6,
            top_ps=[top_p] * 6,
            generators=[torch.Generator().manual_seed(i) for i in range(6)],
        )
        assert picked == greedy(logits)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    g = torch.Generator().manual_seed(5)
    counts = [0, 0, 0, 0]
    for _ in range(3000):
        kw = {"temperatures": [1.0], "top_ks": [None], "top_ps": [None], "generators": [g]}
        counts[sample(logits, **kw)[0]] += 1  # type: ignore[arg-type]
    assert counts[3] == 0
    assert abs(counts[0] / 3000 - 0.5) < 0.05 and abs(counts[2] / 3000 - 0.2) < 0.04
    # top_p=0.75 keeps 0.5 and 0.3 only.
    kept = {
        sample(logits, temperatures=[1.0], top_ks=[None], top_ps=[0.75], generators=[g])[0]
        for _ in range(300)
    }
    assert kept == {0, 1}


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("engine") / "tiny")


def test_engine_queue_bound_and_cancel(engine_model: Path) -> None:
    settings = EngineSettings(max_batch=2, max_queue=1, warmup=False)
    with running_engine(engine_model, settings) as client:
        engine = client.engine
        results: list[FinishReason | None] = []
        long = SamplingParams(max_new_tokens=1500)
        threads = [
            threading.Thread(target=lambda: results.append(client.generate("x", long).finish))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while engine.stats().running + engine.stats().waiting < 3:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.001)
        with pytest.raises(QueueFullError):
            engine.submit(Sequence(prompt=[257, 1], params=long, deadline=1e18))
        for seq in engine.scheduler.sequences():
            engine.cancel(seq)
        for t in threads:
            t.join(30)
        assert results == [FinishReason.CANCELLED] * 3
        done = client.generate("after", SamplingParams(max_new_tokens=5))
        assert done.finish is FinishReason.LENGTH and len(done.tokens) == 5


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(
    engine_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_engine(engine_model, EngineSettings(max_batch=4, warmup=False)) as client:
        decoder = client.engine.decoder
        assert decoder is not None
        real = decoder.decode
        calls = {"n": 0}

        def flaky(*args: object) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated failure")
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(decoder, "decode", flaky)
        failed = client.generate("x", SamplingParams(max_new_tokens=10))
        assert failed.finish is FinishReason.ERROR
        ok = client.generate("y", SamplingParams(max_new_tokens=10))
        assert ok.finish is FinishReason.LENGTH and len(ok.tokens) == 10
        assert client.engine.stats().running == 0


def test_max_seq_len_caps_the_context_and_the_kv_cache(engine_model: Path) -> None:
    # A Llama 3.1 config asks for 131072 tokens of cache per slot: the server's cap sizes it.
    settings = EngineSettings(max_batch=2, warmup=False, max_seq_len=64)
    with running_engine(engine_model, settings) as client:
        engine = client.engine
        assert engine.max_seq_len == 64
        decoder = engine.runner.decoder
        assert decoder is not None and decoder.max_seq_len == 64
        cfg = TINY
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, float32
        assert decoder.cache_bytes() == 2 * 64 * per_token
    args = build_parser({"KILN_MAX_SEQ_LEN": "4096"}).parse_args([])
    assert args.max_seq_len == 4096
    assert build_parser({}).parse_args(["--max-seq-len", "128"]).max_seq_len == 128
