"""Per-sequence output processing: text deltas, stop strings with hold-back, and how a sequence
ends, for the byte tokenizer and a byte-level BPE trained here with `tokenizers`."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import pytest

from inference.detokenizer import Detokenizer
from inference.sequence import FinishReason, SamplingParams, Sequence, Update
from modeling.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
)

BYTES = ByteTokenizer()
PAD, EOS = BYTES.pad_id, BYTES.eos_id


def generate(
    tokens: Iterable[int],
    *,
    stop: tuple[str, ...] = (),
    stream: bool = True,
    max_new_tokens: int = 1000,
    prompt: str = "say: ",
    tokenizer: Tokenizer = BYTES,
) -> tuple[list[Update], Sequence]:
    """Feeds tokens to a fresh sequence's detokenizer until it ends; its updates and itself."""
    seq = Sequence(
        prompt=tokenizer.encode(prompt, add_bos=True),
        params=SamplingParams(max_new_tokens=max_new_tokens, stop=stop),
        deadline=0.0,
        stream=stream,
    )
    seq.detokenizer = Detokenizer(tokenizer, seq)
    updates = []
    for token in tokens:
        update = seq.detokenizer.add(token)
        if update is not None:
            updates.append(update)
        if seq.finish is not None:
            break
    return updates, seq


def shown(updates: list[Update]) -> str:
    return "".join(u.text + u.tail for u in updates)


def test_stop_prefixes_wait_until_they_cannot_be_a_stop() -> None:
    updates, seq = generate(b"abENx", stop=("END",), max_new_tokens=6)
    assert [u.text for u in updates] == ["a", "b", "", "", "ENx"]  # "EN" may have begun "END"
    assert [u.token for u in updates] == list(b"abENx")
    more = seq.detokenizer.add(PAD)  # type: ignore[union-attr]
    assert more is not None and more.text == "" and more.finish is FinishReason.LENGTH
    assert seq.text == "abENx" and seq.completion_tokens == 6


def test_a_stop_string_spanning_tokens_ends_the_sequence_and_is_left_out() -> None:
    updates, seq = generate("é-EN".encode() + b"D", stop=("END", "\n"))
    assert seq.finish is FinishReason.STOP
    assert shown(updates) == seq.text == "é-"
    assert updates[-1].token == ord("D") and updates[-1].finish is FinishReason.STOP
    assert seq.tokens == list("é-END".encode())  # the stop's tokens count as generated


def test_a_stop_string_at_the_very_start() -> None:
    updates, seq = generate(b"abc", stop=("ab",))
    assert seq.finish is FinishReason.STOP and seq.text == "" and shown(updates) == ""
    assert seq.completion_tokens == 2


def test_the_earliest_stop_wins() -> None:
    # "b" and "ab" both end here; the text stops where the first of them starts.
    _, seq = generate(b"xabz", stop=("b", "ab"))
    assert seq.text == "x"
    # A held prefix of one stop string is given out when another one matches after it.
    updates, seq = generate(b"zxbd", stop=("xbdy", "bd"))
    assert seq.finish is FinishReason.STOP and shown(updates) == seq.text == "zx"


def test_half_a_character_waits_for_the_rest() -> None:
    updates, seq = generate("é😀".encode(), max_new_tokens=6)
    assert [u.text for u in updates] == ["", "é", "", "", "", "😀"]
    assert seq.finish is FinishReason.LENGTH and seq.text == "é😀"
    # Cut by the token budget, a half character ends the text as U+FFFD.
    updates, seq = generate("é😀".encode(), max_new_tokens=4)
    assert shown(updates) == seq.text == "é\ufffd"


def test_end_of_sequence_gives_out_what_was_held() -> None:
    updates, seq = generate([*b"xEN", EOS, *b"never"], stop=("END",))
    assert seq.finish is FinishReason.EOS
    assert updates[-1].token is None and updates[-1].tail == "EN"
    assert shown(updates) == seq.text == "xEN"
    assert seq.tokens == list(b"xEN") and seq.completion_tokens == 4  # EOS counts as generated


@pytest.mark.parametrize("stop", [(), ("\n\n", "zz")])
def test_deltas_add_up_to_the_decoded_text(stop: tuple[str, ...]) -> None:
    rng = random.Random(7)
    for _ in range(200):
        # Random bytes: split characters, invalid sequences, specials in between.
        tokens = [rng.choice([*range(256), PAD, ord("z"), ord("\n")]) for _ in range(40)]
        streamed, seq = generate(tokens, stop=stop, max_new_tokens=len(tokens))
        _, whole = generate(tokens, stop=stop, max_new_tokens=len(tokens), stream=False)
        assert shown(streamed) == seq.text == whole.text
        assert seq.finish == whole.finish and seq.tokens == whole.tokens
        if seq.finish is FinishReason.LENGTH:
            assert seq.text == BYTES.decode(tokens)
        else:
            assert seq.finish is FinishReason.STOP
            assert seq.text == BYTES.decode(seq.tokens).split("\n\n")[0].split("zz")[0]


def test_unstreamed_sequences_report_only_their_end() -> None:
    updates, seq = generate(b"hello world", stream=False, max_new_tokens=11)
    assert [(u.finish, u.tail) for u in updates] == [(FinishReason.LENGTH, "hello world")]
    updates, seq = generate(b"hello world", stream=False, stop=("o w",))
    assert [u.finish for u in updates] == [FinishReason.STOP] and seq.text == "hell"


def test_ends_found_elsewhere() -> None:
    _, seq = generate(b"abc", stop=("cd",), max_new_tokens=10)
    update = seq.detokenizer.end(FinishReason.TIMEOUT)  # type: ignore[union-attr]
    assert update.finish is seq.finish is FinishReason.TIMEOUT and update.token is None
    assert seq.text == "abc"


# -- a Hugging Face tokenizer ------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 0\n",
    "Servers stream text to their clients, piece by piece.",
] * 20
SPECIALS = ["<|begin|>", "<|end|>", "<|eot|>"]


def bpe_dir(tmp_path: Path) -> Path:
    """A model directory's tokenizer files: a byte-level BPE (as Llama 3 has) trained here, and
    two end-of-sequence tokens (`eos_token` and generation_config's list)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}, "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id("<|end|>"), tok.token_to_id("<|eot|>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return tmp_path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    tokenizer = load_tokenizer(bpe_dir(tmp_path_factory.mktemp("bpe")))
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


def test_the_hf_tokenizer_through_the_interface(bpe: HFTokenizer) -> None:
    ids = bpe.encode("The quick fox", add_bos=True)
    assert ids[0] == bpe.bos_id and len(ids) < len("The quick fox")  # merges happened
    assert bpe.decode(ids) == "The quick fox"
    assert bpe.eos_ids == {bpe.tokenizer.token_to_id(t) for t in ("<|end|>", "<|eot|>")}
    assert bpe.special_ids == {bpe.tokenizer.token_to_id(t) for t in SPECIALS}


TEXT = "The lazy café serves 日本語 text 😀 to clients, piece by piece.\n"


def test_bpe_deltas_are_whole_characters_and_add_up(bpe: HFTokenizer) -> None:
    prompt = bpe.encode("Servers stream", add_bos=True)
    ids = bpe.encode(TEXT)
    decoder = IncrementalDecoder(bpe, prompt)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    assert "".join(deltas) == TEXT == bpe.decode(ids)
    assert "" in deltas  # some characters took more than one token


def test_bpe_stop_strings_and_end_of_sequence_ids(bpe: HFTokenizer) -> None:
    ids = bpe.encode(TEXT)
    updates, seq = generate(ids, stop=("日本",), tokenizer=bpe)
    assert seq.finish is FinishReason.STOP
    assert shown(updates) == seq.text == "The lazy café serves "
    for eos in sorted(bpe.eos_ids):  # either end-of-sequence id ends the sequence
        updates, seq = generate([*ids[:5], eos, *ids[5:]], tokenizer=bpe)
        assert seq.finish is FinishReason.EOS and seq.text == bpe.decode(ids[:5])
        assert shown(updates) == seq.text


def sentencepiece_like() -> HFTokenizer:
    """A BPE over "▁"-marked words with byte fallback, decoded as Llama 2's tokenizer.json does
    (the leading space of a text's first piece is stripped)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return HFTokenizer(RustTokenizer.from_str(json.dumps(data)), bos_token="<s>")


def test_sentencepiece_deltas_keep_their_spaces() -> None:
    sp = sentencepiece_like()
    prompt = sp.encode("The quick", add_bos=True)
    text = " brown fox café 日本 😀 jumps"
    ids = sp.encode("The quick" + text, add_bos=True)
    assert ids[: len(prompt)] == prompt
    generated = ids[len(prompt) :]
    assert sp.decode(generated) == text.lstrip()  # alone, the first piece loses its space
    decoder = IncrementalDecoder(sp, prompt)
    deltas = [decoder.push(i) for i in generated] + [decoder.flush()]
    assert "".join(deltas) == text  # with the prompt as context it keeps it
    assert not any("\ufffd" in d for d in deltas)  # byte pieces wait for whole characters


# -- the families' tokenizers: Llama 3's byte-level BPE, Llama 2's SentencePiece with byte fallback


@pytest.fixture(scope="module", params=["llama-3", "llama-2"])
def family_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> HFTokenizer:
    from tests.modeling.hf_models import llama2_tokenizer, llama3_tokenizer

    directory = tmp_path_factory.mktemp(request.param)
    (llama3_tokenizer if request.param == "llama-3" else llama2_tokenizer)(directory)
    (directory / "generation_config.json").write_text("{}")
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


FAMILY_TEXT = " brown fox: café, Grüße, 日本語 😀 and\n  def main():\n    return 0"


def test_family_deltas_are_whole_characters_with_their_spaces(
    family_tokenizer: HFTokenizer,
) -> None:
    tok = family_tokenizer
    prompt = tok.encode("The quick", add_bos=True)
    ids = tok.encode("The quick" + FAMILY_TEXT, add_bos=True)
    assert ids[: len(prompt)] == prompt
    generated = ids[len(prompt) :]
    n = len(generated)
    updates, seq = generate(generated, tokenizer=tok, prompt="The quick", max_new_tokens=n)
    deltas = [u.text + u.tail for u in updates]
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    assert "".join(deltas) == seq.text == FAMILY_TEXT  # the leading space kept
    assert "" in deltas  # byte pieces and multi-token characters waited
    _, whole = generate(
        generated, tokenizer=tok, prompt="The quick", max_new_tokens=n, stream=False
    )
    assert whole.text == FAMILY_TEXT


@pytest.mark.parametrize("stop", [(), ("ü", "\n  d"), ("日本", "fox:")])
def test_family_streamed_text_equals_the_unstreamed_text(
    family_tokenizer: HFTokenizer, stop: tuple[str, ...]
) -> None:
    """Random ids (byte pieces cut anywhere, specials, merges): the deltas add up to the text the
    unstreamed sequence ends with, stop strings and all; no delta starts a stop string."""
    tok = family_tokenizer
    rng = random.Random(11)
    vocab = tok.vocab_size
    natural = tok.encode(FAMILY_TEXT)
    for trial in range(150):
        if trial % 2:
            tokens = [rng.randrange(vocab) for _ in range(30)]
        else:  # real text with some ids swapped: stop strings do occur
            tokens = [t if rng.random() < 0.8 else rng.randrange(vocab) for t in natural]
        tokens = [t for t in tokens if t not in tok.eos_ids]
        streamed, seq = generate(tokens, stop=stop, max_new_tokens=len(tokens), tokenizer=tok)
        _, whole = generate(
            tokens, stop=stop, max_new_tokens=len(tokens), stream=False, tokenizer=tok
        )
        assert shown(streamed) == seq.text == whole.text
        assert seq.finish == whole.finish and seq.tokens == whole.tokens
        for s in stop:
            assert s not in seq.text
        if seq.finish is FinishReason.LENGTH and not stop:
            # The prompt's text as context decides the first space; beyond it, decode's text.
            context = tok.encode("say: ", add_bos=True)
            full = tok.decode(context + tokens)
            assert seq.text == full[len(tok.decode(context)) :]
