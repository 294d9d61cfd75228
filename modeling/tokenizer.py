"""Tokenizers: the interface the engine needs, kiln's byte-level tokenizer, incremental decoding.

`Tokenizer` is what serving relies on (encode, decode, the special and end-of-sequence ids);
`ByteTokenizer` implements it for the models kiln trains, and `IncrementalDecoder` turns a growing
list of ids into text deltas through `decode` alone, so it works for any implementation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_TYPE = "kiln-byte-level"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_MODEL_CONFIG = "config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

BYTE_TOKENS = 256
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
DEFAULT_SPECIALS = (PAD, BOS, EOS)
# What a byte-level decode shows for bytes that do not (yet) make a whole character.
REPLACEMENT = "\ufffd"


class Tokenizer(Protocol):
    """What serving needs of a tokenizer; `ByteTokenizer` is one, a Hugging Face one is another.

    Ids are opaque outside the tokenizer: nothing may assume that an id is a byte, or that a
    prompt's length in tokens follows from its text without `encode`.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None:
        """Prepended by `encode(..., add_bos=True)`; None for a tokenizer without one."""
        ...

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends a sequence (Hugging Face models often have several)."""
        ...

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special=True)` leaves out."""
        ...

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """The text of `ids`; bytes that do not end a character decode as U+FFFD."""
        ...


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
        self.eos_ids = frozenset({self.eos_id})
        self.special_ids = frozenset(self.special_tokens.values())
        self._names = {i: t for t, i in self.special_tokens.items()}

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
        ids = ids if isinstance(ids, list | tuple) else list(ids)
        try:
            # The common case, bytes only, in C: the incremental decoder calls this per token.
            out = bytes(ids)
        except ValueError:
            out = bytearray()
            for i in ids:
                if 0 <= i < BYTE_TOKENS:
                    out.append(i)
                elif i in self._names:
                    if not skip_special:
                        out += self._names[i].encode()
                elif not skip_special:
                    out += f"<|unused_{i}|>".encode()
        # Byte-level output can end inside a multi-byte character: replace rather than fail.
        return out.decode("utf-8", errors="replace")

    # -- on disk ---------------------------------------------------------------------------------
    #
    # A Hugging Face `tokenizer.json` that the `tokenizers` library (and so `AutoTokenizer`, vLLM,
    # LMI) runs with the same ids: a BPE whose vocabulary is the 256 byte-level symbols in byte
    # order and that has no merges, so each byte is its own token; the ByteLevel pre-tokenizer
    # (no prefix space, no regex split) maps bytes to those symbols and its decoder maps them back
    # (invalid UTF-8 as U+FFFD, as `decode` does); the specials are added tokens from 256; the
    # post-processor prepends BOS, as kiln's serving does. One difference remains: Hugging Face
    # tokenizers read a literal special token's text ("<|eos|>") as that token, this class never.

    def to_hf_json(self) -> dict[str, Any]:
        """The `tokenizer.json` of this tokenizer in the `tokenizers` library's format."""
        symbols = byte_symbols()
        vocab = {symbols[b]: b for b in range(BYTE_TOKENS)} | self.special_tokens
        bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
        byte_level = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        }
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": i,
                    "content": token,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for token, i in self.special_tokens.items()
            ],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    bos,
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {BOS: {"id": BOS, "ids": [self.bos_id], "tokens": [BOS]}},
            },
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": [],
            },
        }

    def tokenizer_config(self) -> dict[str, Any]:
        """`tokenizer_config.json`: the class `AutoTokenizer` builds and the named specials."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": True,
            "add_eos_token": False,
            # transformers would otherwise delete spaces before punctuation when decoding.
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": [t for t in self.special_tokens if t not in DEFAULT_SPECIALS],
        }

    def save(self, directory: str | Path) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json`; returns the first."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_hf_json(), indent=2, ensure_ascii=False) + "\n")
        config = json.dumps(self.tokenizer_config(), indent=2)
        (directory / HF_TOKENIZER_CONFIG).write_text(config + "\n")
        return path

    @classmethod
    def from_hf_json(cls, data: dict[str, Any]) -> ByteTokenizer | None:
        """The tokenizer a `tokenizer.json` written by `to_hf_json` describes; None for any other
        (a vocabulary that is not the bytes in order, merges, another pre-tokenizer)."""
        model = data.get("model") or {}
        if model.get("type") != "BPE" or model.get("merges"):
            return None
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex"):
            return None
        if data.get("normalizer") is not None:
            return None
        added = sorted(data.get("added_tokens") or [], key=lambda t: t["id"])
        symbols = byte_symbols()
        vocab = model.get("vocab") or {}
        if any(vocab.get(symbols[b]) != b for b in range(BYTE_TOKENS)):
            return None
        if [t["id"] for t in added] != list(range(BYTE_TOKENS, BYTE_TOKENS + len(added))):
            return None
        try:
            return cls(t["content"] for t in added)
        except ValueError:
            return None

    # The format of kiln's first model directories (`{"type": "kiln-byte-level", ...}`): still read.

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteTokenizer:
        """From either form: Hugging Face's `tokenizer.json` or kiln's first format."""
        if "model" in data and "type" not in data:
            tok = cls.from_hf_json(data)
            if tok is None:
                raise ValueError("not kiln's byte-level tokenizer: another Hugging Face tokenizer")
            return tok
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


def byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level BPE (and so Llama 3's) uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(BYTE_TOKENS):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(BYTE_TOKENS + extra)
            extra += 1
    return [symbols[b] for b in range(BYTE_TOKENS)]


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a model directory's `tokenizer.json`) behind the
    `Tokenizer` interface, with the BOS and end-of-sequence tokens its model names."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_tokens: Iterable[str] = (),
        config: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # tokenizer_config.json as read (chat template and all), written back by `save`.
        self.config = dict(config or {})
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        # SentencePiece's byte pieces (`<0x00>`..`<0xFF>`, Llama 2's and Mistral's byte
        # fallback): a run of them decodes as one UTF-8 string, each byte as U+FFFD when the
        # run is not valid, so a run's text is known only once another piece follows.
        pieces = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        self.byte_piece_ids = frozenset(
            int(i) for i in pieces if i is not None and None not in pieces
        )
        self.bos_id = self._id(bos_token) if bos_token else None
        self.eos_ids = frozenset(self._id(token) for token in eos_tokens)

    def _id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(found)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))

    def save(self, directory: str | Path) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` as they were read."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        self.tokenizer.save(str(path))
        text = json.dumps(self.config, indent=2, ensure_ascii=False)
        (directory / HF_TOKENIZER_CONFIG).write_text(text + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """From `tokenizer.json`, with BOS and EOS named by `tokenizer_config.json` and the EOS
        ids of `generation_config.json` and `config.json` (Llama 3 ends a turn on several).

        BOS is prepended where the model's own tokenizer prepends it: as `add_bos_token` says
        where tokenizer_config.json says, else as `tokenizer.json`'s post-processor does (Llama
        and Mistral add `<s>`/`<|begin_of_text|>`; Qwen2 names no BOS).
        """
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(directory)
        tokenizer = RustTokenizer.from_file(str(directory / TOKENIZER_FILE))
        config = _read_json(directory / HF_TOKENIZER_CONFIG)
        template = directory / CHAT_TEMPLATE_FILE
        if "chat_template" not in config and template.is_file():
            # transformers 5 saves the template beside tokenizer_config.json, not in it.
            config["chat_template"] = template.read_text()
        bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
        if bos is not None:
            add_bos = config.get("add_bos_token")
            if add_bos is None:
                bos_id = tokenizer.token_to_id(bos)
                add_bos = tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
            bos = bos if add_bos else None
        loaded = cls(tokenizer, bos_token=bos, eos_tokens=[eos] if eos else [], config=config)
        more: set[int] = set()
        for name in (HF_GENERATION_CONFIG, HF_MODEL_CONFIG):
            ids = _read_json(directory / name).get("eos_token_id")
            if ids is not None:
                more |= {int(i) for i in (ids if isinstance(ids, list) else [ids])}
        loaded.eos_ids = loaded.eos_ids | more
        return loaded


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _token_name(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a model directory (`tokenizer.json`), whatever its kind: kiln's
    byte-level one (either format) as a `ByteTokenizer`, any other as an `HFTokenizer`."""
    data = json.loads((Path(directory) / TOKENIZER_FILE).read_text())
    if not isinstance(data, dict):
        raise ValueError("tokenizer.json does not hold a JSON object")
    if data.get("type") == TOKENIZER_TYPE:
        return ByteTokenizer.from_dict(data)
    byte_level = ByteTokenizer.from_hf_json(data)
    if byte_level is not None:
        return byte_level
    return HFTokenizer.load(directory)


# Second bytes that keep these lead bytes' characters valid (no overlong forms, no surrogates,
# nothing past U+10FFFF); every other continuation byte is 0x80-0xBF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
# Bytes that never begin a character: continuations, and leads of overlong or too-large ones.
NOT_A_START = (*range(0x80, 0xC2), *range(0xF5, 0x100))


def utf8_pending(tail: Sequence[int]) -> tuple[int, int] | None:
    """The byte range the next byte must lie in to continue the character that the byte ids
    `tail` (the last few) have begun, or None when they end on a character boundary."""
    i, continuations = len(tail), 0
    while i > 0 and 0x80 <= tail[i - 1] <= 0xBF and continuations < 3:
        i, continuations = i - 1, continuations + 1
    if i == 0 or not 0xC2 <= tail[i - 1] <= 0xF4:
        return None
    lead = tail[i - 1]
    needed = 1 if lead < 0xE0 else 2 if lead < 0xF0 else 3
    if continuations >= needed:
        return None
    return _SECOND_BYTE.get(lead, (0x80, 0xBF)) if continuations == 0 else (0x80, 0xBF)


def never_generated(tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """Ids a kiln byte-level model may score but must never be given to generate: its start and
    padding tokens (they begin or fill a text, they never continue one) and the unused ids past
    the tokenizer's vocabulary (the embedding table is rounded up; those rows decode to
    nothing). An undertrained model with tied embeddings scores its input token highest, so
    after the start token it would otherwise emit start tokens forever. The end-of-sequence id
    stays: it ends the answer.

    A Hugging Face model you bring gets none: it is served as transformers' generate() serves it
    (tested token for token), which masks neither its BOS, its padding nor its padded rows.
    """
    if not isinstance(tokenizer, ByteTokenizer):
        return []
    banned = {tokenizer.bos_id, tokenizer.pad_id, *range(tokenizer.vocab_size, vocab_size)}
    return sorted(i for i in banned - tokenizer.eos_ids if 0 <= i < vocab_size)


# Prompt tokens decoded before the first generated one: enough for a tokenizer whose pieces
# read differently at the start of a text (SentencePiece drops a leading space) to get it right.
CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """The text of a growing list of ids, as deltas that add up to the decoded whole.

    It decodes a short window through `decode` alone (the prefix/read-offset method of Hugging
    Face's and vLLM's streamers), so it serves byte-level and merge-based tokenizers alike: the
    window holds the ids whose text was already given out (`ids[:read]`, context for the next
    ones) and the new ones; a delta is what decoding the window adds to the text of `ids[:read]`.
    While the window's text ends in U+FFFD (a character still incomplete), or its last id is a
    byte piece of a SentencePiece tokenizer's byte fallback, it waits for more.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.read = len(self.ids)
        self._read_text = tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        """Adds one id; returns the text it completed ("" while it waits for more)."""
        self.ids.append(token)
        return self._advance(final=False)

    def append(self, token: int) -> None:
        """Adds one id without decoding yet (when only the end's text is wanted)."""
        self.ids.append(token)

    def flush(self) -> str:
        """What is left at the end, incomplete characters included (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if not final and self.ids[-1] in getattr(self.tokenizer, "byte_piece_ids", ()):
            return ""  # a later byte piece may turn this run's text into U+FFFDs
        text = self.tokenizer.decode(self.ids)
        done = len(self._read_text)
        if len(text) <= done or (text.endswith(REPLACEMENT) and not final):
            return ""
        # The next window starts where this delta ended: earlier ids are no longer needed.
        del self.ids[: self.read]
        self.read = len(self.ids)
        self._read_text = self.tokenizer.decode(self.ids)
        return text[done:]
