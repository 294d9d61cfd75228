"""The byte-level tokenizer: lossless on any text, special tokens only by request, saved as JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.tokenizer import ByteTokenizer


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
