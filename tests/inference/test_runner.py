"""The model runner's choice of tokens: for a kiln byte-level model never a start, padding or
unused id, and only bytes that keep the text valid UTF-8; for a model you bring, what its own
generate() would choose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.runner import ModelRunner
from inference.sequence import SamplingParams, Sequence
from modeling.tokenizer import ByteTokenizer, never_generated

VOCAB = 320  # a model's vocabulary, padded past the tokenizer's 259 ids


def runner() -> ModelRunner:
    """A runner whose choices are set up as `load` sets them, without a model."""
    run = ModelRunner(Path("unused"), slots=4)
    tok = ByteTokenizer()
    run.tokenizer = tok
    run.banned = torch.tensor(never_generated(tok, VOCAB), dtype=torch.long)
    run.utf8_bytes = True
    from modeling.tokenizer import NOT_A_START

    run._not_a_start = torch.tensor(NOT_A_START, dtype=torch.long)
    return run


def sequence(prompt: bytes, generated: bytes = b"", temperature: float = 0.0) -> Sequence:
    tok = ByteTokenizer()
    seq = Sequence(
        prompt=tok.encode(prompt, add_bos=True),
        params=SamplingParams(max_new_tokens=8, temperature=temperature, seed=0),
        deadline=float("inf"),
    )
    seq.tokens = list(generated)
    seq.generator = torch.Generator().manual_seed(0)
    return seq


def favouring(*ids: int) -> torch.Tensor:
    """Logits that rank `ids` first, in that order, then every other id."""
    logits = torch.zeros(VOCAB)
    for rank, token in enumerate(ids):
        logits[token] = 100.0 - rank
    return logits


def test_an_empty_prompt_continues_after_the_start_token_not_with_it() -> None:
    # An undertrained model with tied embeddings scores its input (the start token) highest.
    tok = ByteTokenizer()
    chosen = runner()._choose([sequence(b"")], favouring(tok.bos_id, tok.pad_id, 300, 65)[None])
    assert chosen == [65]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_end_of_sequence_stays_choosable(temperature: float) -> None:
    tok = ByteTokenizer()
    logits = favouring(tok.eos_id, 65)[None]
    assert runner()._choose([sequence(b"x", temperature=temperature)], logits) == [tok.eos_id]


def test_bytes_keep_the_text_valid_utf8() -> None:
    run = runner()
    tok = ByteTokenizer()
    # At a character boundary a continuation byte (0x97) would decode as U+FFFD: skipped.
    assert run._choose([sequence("日本".encode())], favouring(0x97, 0xE6)[None]) == [0xE6]
    # Inside a character only its continuation bytes may come, not the end or a letter.
    inside = sequence(b"a", b"\xe6")
    assert run._choose([inside], favouring(tok.eos_id, 65, 0x97)[None]) == [0x97]
    # Rows are masked each by their own text.
    both = run._choose(
        [sequence(b"a"), sequence(b"a", b"\xe6\x97")],
        torch.stack([favouring(0x80, 66), favouring(66, 0xA5)]),
    )
    assert both == [66, 0xA5]


@pytest.mark.parametrize("family", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_a_model_you_bring_is_sampled_as_its_own_generate_would(
    family: str, tmp_path: Path
) -> None:
    """The byte-level rules are for kiln's own models: a Hugging Face model keeps every id
    choosable (transformers' generate() masks none) and its tokens are not bytes."""
    from tests.modeling.hf_models import build

    run = ModelRunner(build(family, tmp_path / family), slots=1)
    run.load(warmup=False)
    assert run.tokenizer is not None and not isinstance(run.tokenizer, ByteTokenizer)
    assert never_generated(run.tokenizer, run.vocab_size) == []
    assert run.banned.numel() == 0 and not run.utf8_bytes
    # A BOS or an id past the tokenizer's vocabulary stays the greedy choice when it scores best.
    bos = run.tokenizer.bos_id if run.tokenizer.bos_id is not None else 0
    seq = Sequence(prompt=[bos, 5], params=SamplingParams(max_new_tokens=2), deadline=float("inf"))
    logits = torch.zeros(1, run.vocab_size)
    logits[0, bos] = 1.0
    assert run._choose([seq], logits) == [bos]
