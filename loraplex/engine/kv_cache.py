"""Paged KV-cache block allocator, with prefix caching.

The cache tensors live in the model runner; this class only hands out block ids. A sequence owns
``ceil(num_tokens / block_size)`` blocks, listed in its block table in order; slot
``block * block_size + offset`` holds token ``i = table_index * block_size + offset``.

Prefix caching: a block whose tokens are all computed can be *committed* under a hash of everything its
keys and values depend on (:func:`block_hash`: the previous block's hash, its token ids, the adapter's
content identity, the pixels of the images placed in it). Blocks are reference-counted: a request that starts with a committed prefix shares those
blocks (read-only: it only ever writes positions past them). A block nobody holds stays in the cache, as
*evictable*, until a new block is needed: plain free blocks are handed out first, then evictable ones, least
recently released first (their hashes are dropped).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Optional, Sequence

import numpy as np


def block_hash(parent: Optional[bytes], token_ids: Sequence[int], identity: Optional[bytes],
               extra: bytes = b"") -> bytes:
    """The hash of a full block: SHA-256 of the parent block's hash, the block's token ids, the identity of
    what computed it (the adapter's content hash, or none for the base model) and ``extra`` (the digests of
    the images whose placeholders lie in the block). A cryptographic hash, so that no prompt can be made to
    collide with another tenant's prefix."""
    h = hashlib.sha256()
    h.update(parent or b"root")
    h.update(identity or b"base")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash: list[Optional[bytes]] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> committed block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # committed blocks nobody holds, LRU first
        # counters (metrics): prompt tokens looked up and found, committed blocks evicted
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int, have: int = 0) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"KV cache out of blocks: need {n}, have {self.num_free}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently released cached block
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash[b]]
                self._hash[b] = None
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Release one reference to each block (in table order); a block nobody holds becomes free, or
        evictable when it is committed (the last blocks of a table are evicted first)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    # ---- prefix caching ------------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The committed blocks of the longest prefix of ``hashes``, each now held once more by the caller."""
        hits = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            hits.append(b)
        return hits

    def commit(self, block: int, h: bytes) -> None:
        """``block`` is full and computed, its content described by ``h``: later requests may share it
        (unless an equal block is already committed: then this one stays private)."""
        if self._hash[block] is None and h not in self._cached:
            self._hash[block] = h
            self._cached[h] = block
