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
from training.records import IGNORE, Encoder, Piece, RecordError
from training.storage import is_s3, parse_s3, s3_client

DEFAULT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
# Files of records (one JSON object a line: chat messages, or a prompt and its completion).
RECORDS_SUFFIX = ".jsonl"
# How far past a segment's end a reader looks for the end of its last line, per read.
LINE_CHUNK = 64 << 10
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


def is_records(shard: Shard) -> bool:
    return shard.key.endswith(RECORDS_SUFFIX)


def _line_start(source: Source, shard: Shard, pos: int) -> int:
    """The first line start at or after `pos` (a line starts at 0 or after a newline)."""
    if pos <= 0:
        return 0
    at = pos - 1
    while at < shard.size:
        chunk = source.read(shard.key, at, min(at + LINE_CHUNK, shard.size))
        found = chunk.find(b"\n")
        if found >= 0:
            return at + found + 1
        at += len(chunk)
    return shard.size


def read_lines(source: Source, seg: Segment) -> tuple[int, bytes]:
    """Where they start and the whole lines that start inside the segment: a tokenizer never
    sees a word or a character (or a record) cut at a segment's byte boundary."""
    start = _line_start(source, seg.shard, seg.start)
    end = seg.shard.size if seg.last else _line_start(source, seg.shard, seg.end)
    return start, source.read(seg.shard.key, start, end) if start < end else b""


def segment_pieces(source: Source, seg: Segment, encoder: Encoder) -> list[Piece]:
    """A segment's text (bos at a document's start, end-of-text at its end) or its records."""
    offset, data = read_lines(source, seg)
    if not is_records(seg.shard):
        if not data and not (seg.first or seg.last):
            return []
        return [
            encoder.text(data.decode("utf-8", errors="replace"), first=seg.first, last=seg.last)
        ]
    pieces = []
    for line in data.split(b"\n"):
        if line.strip():
            try:
                pieces.append(encoder.record(line.decode("utf-8")))
            except (RecordError, UnicodeDecodeError) as err:
                where = f"{source.describe().rstrip('/')}/{seg.shard.key}"
                raise DataError(
                    f"{where}: the record on the line at byte {offset}: {err}"
                ) from None
        offset += len(line) + 1
    return pieces


def pack(pieces: Sequence[Piece], block: int, pad_id: int) -> Tensor:
    """Pieces packed into blocks of `block` tokens, int64 [n, 2, block]: ids, then labels (the
    id where it is a target, IGNORE elsewhere). Text runs on across blocks; a record starts a new
    block when it does not fit in the current one's rest (which is padded), a record longer
    than a block is cut to one, and a last partial block is kept (padded) when it holds a
    record."""
    ids: list[Tensor] = []
    labels: list[Tensor] = []
    used = 0  # tokens in the current (last) block
    record_tail = False
    for p in pieces:
        n = len(p.ids)
        if p.record:
            room = block - used
            if n > room and used:
                ids.append(torch.full((room,), pad_id, dtype=torch.int64))
                labels.append(torch.full((room,), IGNORE, dtype=torch.int64))
                used = 0
            n = min(n, block)
            record_tail = True
        ids.append(torch.tensor(p.ids[:n], dtype=torch.int64))
        labels.append(torch.tensor(p.labels()[:n], dtype=torch.int64))
        used = (used + n) % block
        if used == 0:
            record_tail = False
    if used and record_tail:
        ids.append(torch.full((block - used,), pad_id, dtype=torch.int64))
        labels.append(torch.full((block - used,), IGNORE, dtype=torch.int64))
    if not ids:
        return torch.empty(0, 2, block, dtype=torch.int64)
    flat = torch.stack([torch.cat(ids), torch.cat(labels)])
    n = flat.shape[1] // block
    return flat[:, : n * block].view(2, n, block).transpose(0, 1).contiguous()


def inputs_targets(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """A batch's inputs and next-token targets: from [n, seq_len + 1] ids (every token a target)
    or [n, 2, seq_len + 1] ids and labels (IGNORE where not)."""
    if blocks.dim() == 2:
        return blocks[:, :-1], blocks[:, 1:]
    return blocks[:, 0, :-1], blocks[:, 1, 1:]


class BlockStream:
    """An endless, seeded, resumable stream of training blocks: [n, seq_len + 1] ids for text
    with the byte tokenizer, whose layout follows from the listing, else [n, 2, seq_len + 1]
    ids and labels, tokenized a window at a time (`encoder`, the model's tokenizer)."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        seq_len: int,
        seed: int,
        window_bytes: int = 16 << 20,
        tokenizer: ByteTokenizer | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self.tok = tokenizer or ByteTokenizer()
        self.encoder = encoder
        self.block = seq_len + 1
        segment_bytes = max(s.end - s.start for s in corpus.train)
        self.window_segments = max(1, window_bytes // max(1, segment_bytes))
        self.epoch = self.window = self.offset = 0
        self._blocks: Tensor | None = None  # the current window's blocks, shuffled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-data")
        self._next: tuple[tuple[int, int], Future[Tensor]] | None = None
        if encoder is None and self._epoch_blocks(0) == 0:
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
        if self.encoder is None:
            ids = read_segments(self.corpus.source, segs, self.tok)
            n = ids.numel() // self.block
            blocks = ids[: n * self.block].view(n, self.block)
        else:
            enc = self.encoder
            pieces = [p for s in segs for p in segment_pieces(self.corpus.source, s, enc)]
            blocks = pack(pieces, self.block, enc.pad_id)
            n = blocks.shape[0]
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
        """The next n blocks of the stream, int64 [n, seq_len + 1] (or [n, 2, seq_len + 1])."""
        out = []
        empty = 0  # windows in a row that made no block: a whole epoch of them is an error
        while n > 0:
            blocks = self._current()
            take = blocks[self.offset : self.offset + n]
            out.append(take)
            n -= take.shape[0]
            self.offset += take.shape[0]
            empty = empty + 1 if blocks.shape[0] == 0 else 0
            if empty > len(self._order(self.epoch)):
                raise DataError(
                    f"too little training data under {self.corpus.source.describe()}: it makes "
                    f"no block of seq_len + 1 = {self.block} tokens (add data or lower --seq-len)"
                )
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
    corpus: Corpus,
    *,
    seq_len: int,
    max_blocks: int,
    tokenizer: ByteTokenizer | None = None,
    encoder: Encoder | None = None,
) -> Tensor:
    """Up to max_blocks fixed validation blocks, read in the split's stable order."""
    tok = tokenizer or ByteTokenizer()
    block = seq_len + 1
    if encoder is not None:
        pieces: list[Piece] = []
        blocks = pack([], block, encoder.pad_id)
        for seg in corpus.val:
            pieces += segment_pieces(corpus.val_source, seg, encoder)
            blocks = pack(pieces, block, encoder.pad_id)
            if blocks.shape[0] >= max_blocks:
                break
        if corpus.val and blocks.shape[0] == 0:
            raise DataError(
                f"the validation split of {corpus.val_source.describe()} makes no block of "
                f"{block} tokens: raise --val-fraction, lower --seq-len, or pass --val-fraction 0"
            )
        return blocks[:max_blocks]
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
