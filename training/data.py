"""Streams text shards from a directory or S3 prefix as shuffled, resumable blocks of token ids.

A shard is one text file (one document). Shards are cut into byte-range segments; a stable hash
of each segment's name holds some out for validation, so the split does not move with the seed.
An epoch visits the training segments in a seeded order, a window of them at a time: a window's
tokens (bos + bytes + eos per document, packed) are cut into blocks of `seq_len + 1` tokens and
the blocks are shuffled within it. Only one window (plus the next, prefetched) is in memory.
With a byte-level tokenizer a segment's token count is its byte count (plus bos/eos), so the
whole layout follows from the listing; the stream's position is three integers
(epoch, window, block) and a resumed stream yields exactly the blocks the original would have.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from modeling.tokenizer import ByteTokenizer
from training.storage import is_s3, parse_s3, s3_client

DEFAULT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
# The default corpus's own noise: installed packages are not the standard library.
STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """Data that cannot be trained on; the message names the location and what to change."""


@dataclass(frozen=True)
class Shard:
    key: str  # path relative to the directory or the S3 prefix
    size: int


@dataclass(frozen=True)
class Segment:
    shard: Shard
    index: int
    start: int
    end: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.shard.size

    @property
    def tokens(self) -> int:
        return self.end - self.start + int(self.first) + int(self.last)

    def split_key(self) -> bytes:
        return hashlib.sha256(f"{self.shard.key}\0{self.index}".encode()).digest()


class Source(Protocol):
    def describe(self) -> str: ...
    def list_shards(self) -> list[Shard]: ...
    def read(self, key: str, start: int, end: int) -> bytes: ...


def _wanted(name: str, suffixes: Sequence[str]) -> bool:
    return not name.startswith(".") and (not suffixes or name.endswith(tuple(suffixes)))


class LocalSource:
    """Text files under a directory (recursively; hidden files and directories skipped)."""

    def __init__(
        self,
        root: str | Path,
        suffixes: Sequence[str] = DEFAULT_SUFFIXES,
        exclude_dirs: frozenset[str] = frozenset(),
    ) -> None:
        self.root = Path(root)
        self.suffixes = tuple(suffixes)
        self.exclude_dirs = exclude_dirs

    def describe(self) -> str:
        return str(self.root)

    def list_shards(self) -> list[Shard]:
        if not self.root.exists():
            raise DataError(f"data directory {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"data path {self.root} is not a directory")
        shards = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [
                d for d in dirnames if not d.startswith(".") and d not in self.exclude_dirs
            ]
            for name in filenames:
                path = Path(dirpath) / name
                if _wanted(name, self.suffixes) and path.is_file():
                    shards.append(
                        Shard(path.relative_to(self.root).as_posix(), path.stat().st_size)
                    )
        return sorted(shards, key=lambda s: s.key)

    def read(self, key: str, start: int, end: int) -> bytes:
        with open(self.root / key, "rb") as f:
            f.seek(start)
            return f.read(end - start)


class S3Source:
    """Text objects under an S3 prefix, read by ranged GETs."""

    def __init__(
        self, uri: str, suffixes: Sequence[str] = DEFAULT_SUFFIXES, client: Any | None = None
    ) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3(uri)
        self.suffixes = tuple(suffixes)
        self.client = client or s3_client()

    def describe(self) -> str:
        return self.uri

    def list_shards(self) -> list[Shard]:
        from botocore.exceptions import ClientError

        shards = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    parts = key[len(self.prefix) :].split("/")
                    if any(p.startswith(".") for p in parts[:-1]) or key.endswith("/"):
                        continue
                    if _wanted(parts[-1], self.suffixes):
                        # Relative keys: a copy of the data under another prefix splits alike.
                        shards.append(Shard(key[len(self.prefix) :], int(obj["Size"])))
        except ClientError as err:
            raise DataError(f"cannot list {self.uri}: {err}") from err
        return sorted(shards, key=lambda s: s.key)

    def read(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        obj = self.client.get_object(
            Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={start}-{end - 1}"
        )
        return bytes(obj["Body"].read())


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def open_source(location: str | None, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> Source:
    """A local directory, an s3:// prefix, or (None) the standard library's .py files."""
    if location is None:
        return LocalSource(stdlib_dir(), (".py",), STDLIB_EXCLUDE)
    if is_s3(location):
        return S3Source(location, suffixes)
    if "://" in location:
        raise DataError(f"{location!r}: data must be a local directory or an s3:// prefix")
    return LocalSource(location, suffixes)


def segments_of(shards: Sequence[Shard], segment_bytes: int) -> list[Segment]:
    out = []
    for shard in shards:
        for i, start in enumerate(range(0, shard.size, segment_bytes)):
            out.append(Segment(shard, i, start, min(start + segment_bytes, shard.size)))
    return out


def _list_nonempty(source: Source, suffixes_hint: str) -> list[Shard]:
    shards = source.list_shards()
    if not shards:
        raise DataError(f"no text files ({suffixes_hint}) under {source.describe()}")
    nonempty = [s for s in shards if s.size > 0]
    if not nonempty:
        raise DataError(f"the {len(shards)} text files under {source.describe()} are all empty")
    return nonempty


@dataclass
class Corpus:
    """The training and validation segments of a source (or of two sources)."""

    source: Source
    train: list[Segment]
    val: list[Segment]
    val_source: Source

    @classmethod
    def build(
        cls,
        source: Source,
        *,
        segment_bytes: int = 1 << 20,
        val_fraction: float = 0.02,
        val_source: Source | None = None,
    ) -> Corpus:
        if segment_bytes < 1:
            raise DataError(f"segment_bytes must be >= 1, got {segment_bytes}")
        hint = ", ".join(getattr(source, "suffixes", ())) or "any name"
        segments = segments_of(_list_nonempty(source, hint), segment_bytes)
        if val_source is not None:
            val = segments_of(_list_nonempty(val_source, hint), segment_bytes)
            return cls(source, segments, sorted(val, key=Segment.split_key), val_source)
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction == 0:
            return cls(source, segments, [], source)
        ranked = sorted(segments, key=Segment.split_key)
        k = max(1, round(len(ranked) * val_fraction))
        if k >= len(ranked):
            raise DataError(
                f"{source.describe()} has {len(ranked)} segment(s) of at most {segment_bytes} "
                f"bytes: too few to hold out a validation split of {val_fraction}; add text, "
                "lower --segment-bytes, or pass --val-fraction 0"
            )
        val_set = set(ranked[:k])
        return cls(source, [s for s in segments if s not in val_set], ranked[:k], source)

    @property
    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.train)


def _generator(*parts: int) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def read_segments(source: Source, segments: Sequence[Segment], tok: ByteTokenizer) -> Tensor:
    """The packed token ids of consecutive segments: bos before a document, eos after it."""
    parts = [
        tok.encode_tensor(source.read(s.shard.key, s.start, s.end), add_bos=s.first, add_eos=s.last)
        for s in segments
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


class BlockStream:
    """An endless, seeded, resumable stream of [seq_len + 1] training blocks (input + target)."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        seq_len: int,
        seed: int,
        window_bytes: int = 16 << 20,
        tokenizer: ByteTokenizer | None = None,
    ) -> None:
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self.tok = tokenizer or ByteTokenizer()
        self.block = seq_len + 1
        segment_bytes = max(s.end - s.start for s in corpus.train)
        self.window_segments = max(1, window_bytes // max(1, segment_bytes))
        self.epoch = self.window = self.offset = 0
        self._blocks: Tensor | None = None  # the current window's blocks, shuffled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-data")
        self._next: tuple[tuple[int, int], Future[Tensor]] | None = None
        if self._epoch_blocks(0) == 0:
            raise DataError(
                f"too little training text under {corpus.source.describe()}: "
                f"{corpus.train_tokens} tokens make no block of seq_len + 1 = {self.block} tokens "
                "(add text or lower --seq-len)"
            )

    def _order(self, epoch: int) -> list[list[Segment]]:
        perm = torch.randperm(len(self.corpus.train), generator=_generator(self.seed, epoch))
        segs = [self.corpus.train[i] for i in perm.tolist()]
        w = self.window_segments
        return [segs[i : i + w] for i in range(0, len(segs), w)]

    def _epoch_blocks(self, epoch: int) -> int:
        return sum(sum(s.tokens for s in win) // self.block for win in self._order(epoch))

    def _load(self, epoch: int, window: int) -> Tensor:
        segs = self._order(epoch)[window]
        ids = read_segments(self.corpus.source, segs, self.tok)
        n = ids.numel() // self.block
        blocks = ids[: n * self.block].view(n, self.block)
        return blocks[torch.randperm(n, generator=_generator(self.seed, epoch, window, 1))]

    def _advance(self) -> tuple[int, int]:
        windows = len(self._order(self.epoch))
        return (self.epoch, self.window + 1) if self.window + 1 < windows else (self.epoch + 1, 0)

    def _current(self) -> Tensor:
        if self._blocks is None:
            key = (self.epoch, self.window)
            if self._next is not None and self._next[0] == key:
                self._blocks = self._next[1].result()
            else:
                self._blocks = self._load(*key)
            nxt = self._advance()
            self._next = (nxt, self._pool.submit(self._load, *nxt))
        return self._blocks

    def next_blocks(self, n: int) -> Tensor:
        """The next n blocks of the stream, int64 [n, seq_len + 1]."""
        out = []
        while n > 0:
            blocks = self._current()
            take = blocks[self.offset : self.offset + n]
            out.append(take)
            n -= take.shape[0]
            self.offset += take.shape[0]
            if self.offset >= blocks.shape[0]:
                self.epoch, self.window = self._advance()
                self.offset, self._blocks = 0, None
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.window, self.offset = state["epoch"], state["window"], state["offset"]
        self._blocks = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def validation_blocks(
    corpus: Corpus, *, seq_len: int, max_blocks: int, tokenizer: ByteTokenizer | None = None
) -> Tensor:
    """Up to max_blocks fixed validation blocks, read in the split's stable order."""
    tok = tokenizer or ByteTokenizer()
    block = seq_len + 1
    chunks: list[Tensor] = []
    have = 0
    for seg in corpus.val:
        if have >= max_blocks * block:
            break
        ids = read_segments(corpus.val_source, [seg], tok)
        chunks.append(ids)
        have += ids.numel()
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    n = min(max_blocks, ids.numel() // block)
    if corpus.val and n == 0:
        raise DataError(
            f"the validation split of {corpus.val_source.describe()} has {ids.numel()} tokens, "
            f"less than one block of {block}: raise --val-fraction, lower --seq-len, "
            "or pass --val-fraction 0"
        )
    return ids[: n * block].view(n, block)


def iter_blocks(blocks: Tensor, batch: int) -> Iterator[Tensor]:
    for i in range(0, blocks.shape[0], batch):
        yield blocks[i : i + batch]
