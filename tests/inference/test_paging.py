"""The paged KV cache with a model: block tables, chunked prefill, prefix reuse, preemption and the
cache's memory budget, each against what the engine computed before (or cold)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from inference.decoder import Decoder, row_buckets
from inference.engine import EngineSettings, running_engine
from inference.runner import ModelLoadError
from inference.sequence import FinishReason, SamplingParams, Sequence
from modeling.attention import KVCache
from modeling.config import ModelConfig
from modeling.model import LlamaModel
from tests.inference.support import TINY, write_model

CPU, FP32 = torch.device("cpu"), torch.float32


def model(cfg: ModelConfig, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("kind", ["kernel", "padded"])
def test_a_sequence_in_scattered_blocks_decodes_bitwise_as_in_contiguous_ones(kind: str) -> None:
    cfg = dataclasses.replace(TINY, max_seq_len=256)
    buckets = None if kind == "kernel" else row_buckets(4)
    ids = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        dec = Decoder(model(cfg), slots=4, device=CPU, dtype=FP32, buckets=buckets)
        assert dec.attention_kernel == (kind == "kernel")
        # Out of order, in slots 2 and 3's fixed tables (slot 0 holds blocks 0-15, slot 1 16-31).
        scattered = [60, 35, 41, 47, 58, 33]
        dec.prefill(0, ids[:70])
        dec.prefill(scattered, ids[:70])
        other = list(range(dec.blocks_per_seq, 2 * dec.blocks_per_seq))  # slot 1's
        dec.prefill(other, ids[20:50])
        for p in range(70, 90):
            contiguous = dec.decode([0], [p], [int(ids[p])])[0]
            paged = dec.decode([scattered, other], [p, 30], [int(ids[p]), 7])[0]
            assert torch.equal(paged, contiguous), p


def test_chunked_prefill_gives_the_one_shot_logits_and_cache() -> None:
    cfg = dataclasses.replace(TINY, max_seq_len=256)
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        dec = Decoder(model(cfg), slots=2, device=CPU, dtype=FP32)
        one_shot = dec.prefill(0, ids)
        chunked = [dec.prefill(1, ids[start : start + 7], start) for start in range(0, 100, 7)]
        torch.testing.assert_close(chunked[-1], one_shot, atol=1e-4, rtol=1e-4)
        n = dec.blocks_per_seq
        for kv in dec.cache.kv:
            torch.testing.assert_close(kv[:, n : 2 * n], kv[:, :n], atol=1e-5, rtol=1e-5)
        # The greedy continuation is the same from either.
        a, b = int(one_shot.argmax()), int(chunked[-1].argmax())
        assert a == b
        for p in range(100, 110):
            la, lb = dec.decode([0, 1], [p, p], [a, b])
            a, b = int(la.argmax()), int(lb.argmax())
            assert a == b


# ---------------------------------------------------------------------------------------------
# the engine


@pytest.fixture(scope="module")
def paged_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("paged"))


def block_gib(block_size: int = 16, cfg: ModelConfig = TINY) -> float:
    return KVCache.block_bytes(cfg, block_size, FP32) / 2**30


PREFIX = "You are a helpful assistant who answers in one short sentence. " * 2


def test_a_shared_prefix_is_computed_once_and_answers_as_cold(paged_model: Path) -> None:
    greedy = SamplingParams(max_new_tokens=12)
    question = "What is the capital of France?"
    with running_engine(paged_model, EngineSettings(max_batch=2, warmup=False)) as client:
        first = client.generate(PREFIX + "Hello.", greedy)
        second = client.generate(PREFIX + question, greedy)
        stats = client.engine.stats().cache
    cold_settings = EngineSettings(max_batch=2, warmup=False, prefix_cache=False)
    with running_engine(paged_model, cold_settings) as client:
        cold = client.generate(PREFIX + question, greedy)
    assert first.cached_tokens == 0 and cold.cached_tokens == 0
    shared = len(client.engine.encode_prompt(PREFIX)) // 16 * 16  # full blocks, BOS included
    assert shared >= 112
    assert second.cached_tokens == shared
    assert stats is not None and stats.hits == shared and stats.cached > 0
    # Only the new tokens were computed: the prompt minus the cached blocks.
    assert second.prefilled_tokens == len(second.prompt) - shared
    assert cold.prefilled_tokens == len(cold.prompt)
    assert second.tokens == cold.tokens and second.text == cold.text


def test_out_of_blocks_preempts_and_recomputes_with_the_same_answers(paged_model: Path) -> None:
    """Three requests of 4 blocks each in a cache of 6: some are preempted and recomputed; all
    complete, each with the answer it gives alone."""
    prompts = [f"request number {i}: tell me" for i in range(3)]
    params = SamplingParams(max_new_tokens=36)
    with running_engine(paged_model, EngineSettings(max_batch=4, warmup=False)) as client:
        alone = [client.generate(p, params).tokens for p in prompts]
    settings = EngineSettings(
        max_batch=4, warmup=False, max_seq_len=64, kv_cache_gib=6.5 * block_gib()
    )
    with running_engine(paged_model, settings) as client:
        assert client.engine.runner.cache_blocks == 6
        done: list[Sequence] = [None] * 3  # type: ignore[list-item]

        def ask(i: int) -> None:
            done[i] = client.generate(prompts[i], params)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(s.finish is FinishReason.LENGTH for s in done)
    assert sum(s.preemptions for s in done) >= 1
    assert [s.tokens for s in done] == alone


def test_the_kv_cache_is_sized_by_its_budget(paged_model: Path) -> None:
    settings = EngineSettings(
        max_batch=2, warmup=False, max_seq_len=64, kv_cache_gib=block_gib(16) * 10
    )
    with running_engine(paged_model, settings) as client:
        runner = client.engine.runner
        assert runner.cache_blocks == 10
        assert (
            runner.decoder is not None and runner.decoder.cache_bytes() == 10 * 2**30 * block_gib()
        )
    # By default: room for max_batch sequences of the context served.
    with running_engine(
        paged_model, EngineSettings(max_batch=3, warmup=False, max_seq_len=64)
    ) as c:
        assert c.engine.runner.cache_blocks == 3 * 4
    too_small = EngineSettings(max_batch=2, warmup=False, max_seq_len=64, kv_cache_gib=block_gib())
    with (
        pytest.raises(
            ModelLoadError,
            match="holds 16 tokens, fewer than one sequence of the context served \\(64",
        ),
        running_engine(paged_model, too_small),
    ):
        pass


def test_a_long_prompt_prefilled_in_chunks_answers_as_in_one(paged_model: Path) -> None:
    prompt = "a long prompt that goes on and on, " * 12
    params = SamplingParams(max_new_tokens=10)
    answers = []
    for chunk in (512, 24):
        with running_engine(
            paged_model, EngineSettings(max_batch=2, warmup=False, prefill_chunk=chunk)
        ) as c:
            answers.append(c.generate(prompt, params).tokens)
    assert answers[0] == answers[1]


def test_the_server_flags_and_their_variables() -> None:
    from inference.serve import build_parser

    env = {"KILN_KV_CACHE_GIB": "1.5", "KILN_PREFILL_CHUNK": "64"}
    args = build_parser(env).parse_args([])
    assert (args.kv_cache_gib, args.prefill_chunk) == (1.5, 64)
    args = build_parser(env).parse_args(["--kv-cache-gib", "0.25", "--prefill-chunk", "128"])
    assert (args.kv_cache_gib, args.prefill_chunk) == (0.25, 128)
    defaults = build_parser({}).parse_args([])
    assert (defaults.kv_cache_gib, defaults.prefill_chunk) == (None, 512)
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["--kv-cache-gib", "0"])
