"""The byte-level tokenizer: lossless on any text, special tokens only by request, saved as JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.tokenizer import ByteTokenizer, never_generated, utf8_pending


def test_round_trip_of_unicode_and_specials() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ \x00 <|eos|>"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1])  # a literal "<|eos|>" in text stays bytes
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == "<|bos|>" + text + "<|eos|>"
    assert tok.encode_tensor(text.encode(), add_bos=True, add_eos=True).tolist() == ids


def test_ids_and_vocab() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character decodes, replaced


def test_saved_with_extra_special_tokens(tmp_path: Path) -> None:
    tok = ByteTokenizer(["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>"])
    tok.save(tmp_path)
    back = ByteTokenizer.load(tmp_path)
    assert back.special_tokens == {"<|pad|>": 256, "<|bos|>": 257, "<|eos|>": 258, "<|user|>": 259}
    assert back.vocab_size == 260


def test_missing_required_specials_are_refused() -> None:
    with pytest.raises(ValueError, match="must include"):
        ByteTokenizer(["<|pad|>"])


def test_never_generated_are_the_start_pad_and_unused_ids() -> None:
    tok = ByteTokenizer()
    # A model's vocabulary (320) is padded past the tokenizer's (259): those rows are no text.
    assert never_generated(tok, 320) == [tok.pad_id, tok.bos_id, *range(259, 320)]
    assert tok.eos_id not in never_generated(tok, 320)


@pytest.mark.parametrize(
    ("text", "pending"),
    [
        ("abc", None),
        ("é", None),
        ("日本", None),
        ("\U0001f600", None),
    ],
)
def test_utf8_pending_at_character_boundaries(text: str, pending: None) -> None:
    assert utf8_pending(list(text.encode())) is pending


@pytest.mark.parametrize(
    ("prefix", "allowed"),
    [
        (b"a\xc3", (0x80, 0xBF)),  # é's second byte
        (b"\xe6", (0x80, 0xBF)),
        (b"\xe6\x97", (0x80, 0xBF)),  # the third of three
        (b"\xe0", (0xA0, 0xBF)),  # no overlong three-byte forms
        (b"\xed", (0x80, 0x9F)),  # no surrogates
        (b"\xf0", (0x90, 0xBF)),
        (b"\xf4", (0x80, 0x8F)),  # nothing past U+10FFFF
        (b"\xf0\x9f\x98", (0x80, 0xBF)),
    ],
)
def test_utf8_pending_inside_a_character(prefix: bytes, allowed: tuple[int, int]) -> None:
    assert utf8_pending([257, *prefix]) == allowed
