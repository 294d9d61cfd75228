"""The KV-cache block manager: which cache blocks each sequence holds, and the prefix cache.

The cache is `blocks` blocks of `block_size` positions (`modeling.attention.KVCache`). A sequence
holds a block table, the blocks of its positions in order. A full block whose keys and values
are computed is registered under a digest of its tokens and of every token before it (the
digest of the previous block's digest and this block's tokens), so a later sequence whose
tokens start the same way takes those blocks instead of computing them: reference counts say
how many sequences hold a block. A registered block nobody holds stays cached, least recently
used first out, until a new block is needed and no free one is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    """Every block is held by a running sequence."""


@dataclass
class BlockStats:
    blocks: int
    free: int  # neither held nor cached
    cached: int  # registered, held by nobody: reusable, evicted when space is needed
    hits: int  # prompt tokens taken from the prefix cache, since the start


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: its tokens and, through the parent's digest, all before it."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Free blocks, reference counts and the prefix cache (engine thread only)."""

    def __init__(self, blocks: int, block_size: int, *, prefix_cache: bool = True) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"need one block of one position at least, got {blocks}x{block_size}")
        self.blocks, self.block_size = blocks, block_size
        self.prefix_cache = prefix_cache
        self._free = list(range(blocks - 1, -1, -1))  # lowest id first out
        self._refs = [0] * blocks
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        # Registered blocks nobody holds, least recently released first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0

    def stats(self) -> BlockStats:
        return BlockStats(self.blocks, len(self._free), len(self._lru), self.hits)

    def available(self) -> int:
        """Blocks a new allocation can take: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._lru)

    def unheld(self, blocks: list[int]) -> int:
        """How many of these (cached) blocks nobody holds: taking them uses up available ones."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- prefix reuse ----------------------------------------------------------------------------

    def digests(self, tokens: list[int], parents: list[bytes] | None = None) -> list[bytes]:
        """The digests of the full blocks of `tokens`, extending `parents` (those already known
        of the same tokens' first blocks)."""
        out = list(parents or [])
        bs = self.block_size
        for i in range(len(out), len(tokens) // bs):
            out.append(block_digest(out[-1] if out else b"", tokens[i * bs : (i + 1) * bs]))
        return out

    def cached_prefix(self, digests: list[bytes], limit: int) -> list[int]:
        """The cached blocks of the longest run of leading digests, at most `limit` blocks."""
        if not self.prefix_cache:
            return []
        found: list[int] = []
        for digest in digests[:limit]:
            block = self._by_digest.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, block: int, digest: bytes) -> None:
        """Marks a held block as computed and full, findable by `digest` (a block with the same
        digest already registered keeps its place; this one stays private)."""
        if self.prefix_cache and digest not in self._by_digest and block not in self._digest_of:
            self._by_digest[digest] = block
            self._digest_of[block] = digest

    # -- holding and releasing -------------------------------------------------------------------

    def take(self, blocks: list[int]) -> None:
        """Holds blocks found by `cached_prefix` (counted as hits)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._lru[block]
            self._refs[block] += 1
        self.hits += len(blocks) * self.block_size

    def allocate(self, n: int) -> list[int]:
        """n new blocks: free ones first, then the least recently used cached ones (forgotten)."""
        if n > self.available():
            raise OutOfBlocksError(f"{n} blocks wanted, {self.available()} available")
        out: list[int] = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._lru.popitem(last=False)
                del self._by_digest[self._digest_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drops one hold of each block; unheld ones become free, or cached if registered.
        Released last block first, so a sequence's tail is evicted before its shared head."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released more than held"
            if self._refs[block] == 0:
                if block in self._digest_of:
                    self._lru[block] = None
                else:
                    self._free.append(block)
