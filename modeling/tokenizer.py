"""A byte-level tokenizer: ids 0-255 are bytes, then special tokens; saved with the model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_TYPE = "kiln-byte-level"

BYTE_TOKENS = 256
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
DEFAULT_SPECIALS = (PAD, BOS, EOS)


class ByteTokenizer:
    """UTF-8 bytes as ids, plus special tokens numbered from 256 (pad, bos, eos by default).

    Text never produces a special id: a literal "<|eos|>" in text encodes as its bytes, so data
    cannot forge document boundaries.
    """

    def __init__(self, special_tokens: Iterable[str] = DEFAULT_SPECIALS) -> None:
        specials = list(special_tokens)
        missing = [t for t in DEFAULT_SPECIALS if t not in specials]
        if missing:
            raise ValueError(f"special tokens must include {missing}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"duplicate special tokens in {specials}")
        self.special_tokens = {tok: BYTE_TOKENS + i for i, tok in enumerate(specials)}
        self.pad_id = self.special_tokens[PAD]
        self.bos_id = self.special_tokens[BOS]
        self.eos_id = self.special_tokens[EOS]

    @property
    def vocab_size(self) -> int:
        return BYTE_TOKENS + len(self.special_tokens)

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids = list(data)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_tensor(
        self, data: bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> torch.Tensor:
        """Bytes to an int64 tensor without a Python list per byte (the data loader's path)."""
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        parts = []
        if add_bos:
            parts.append(torch.tensor([self.bos_id]))
        parts.append(body)
        if add_eos:
            parts.append(torch.tensor([self.eos_id]))
        return torch.cat(parts) if len(parts) > 1 else body

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        names = {i: t for t, i in self.special_tokens.items()}
        out = bytearray()
        for i in ids:
            if 0 <= i < BYTE_TOKENS:
                out.append(i)
            elif i in names:
                if not skip_special:
                    out += names[i].encode()
            elif not skip_special:
                out += f"<|unused_{i}|>".encode()
        # Byte-level output can end inside a multi-byte character: replace rather than fail.
        return out.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": TOKENIZER_TYPE,
            "version": 1,
            "byte_tokens": BYTE_TOKENS,
            "special_tokens": self.special_tokens,
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": EOS,
            "vocab_size": self.vocab_size,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteTokenizer:
        if data.get("type") != TOKENIZER_TYPE:
            raise ValueError(f"not a {TOKENIZER_TYPE} tokenizer: type={data.get('type')!r}")
        specials = sorted(data["special_tokens"].items(), key=lambda kv: kv[1])
        tok = cls(name for name, _ in specials)
        if tok.special_tokens != dict(specials):
            raise ValueError(f"special token ids must run from {BYTE_TOKENS} without gaps")
        return tok

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        return cls.from_dict(json.loads((Path(directory) / TOKENIZER_FILE).read_text()))
