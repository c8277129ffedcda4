"""Paged KV block allocation with reference counts and prefix sharing; hands out block ids only.

A block is "cached" when it is full, its KV has been computed, and it is registered under a key
that chains the hash of the previous block with its own tokens (and an optional extra key, e.g.
the hash of an image whose placeholder tokens it holds). Equal prefixes then map to equal keys,
so a new request can take the blocks of an earlier one instead of recomputing them.

A freed block keeps its registration while it sits on the free list: its KV is still in the
cache, so a later request can hit it until the block is handed out again for new tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import msgspec

# (parent block digest or None for the first block, the block's tokens, extra key or None)
BlockKey = tuple[bytes | None, tuple[int, ...], Hashable | None]


def block_digest(key: BlockKey) -> bytes:
    """A collision-resistant digest of a block and, through its parent's, of its whole prefix.

    Python's hash() would let a crafted prompt collide with another user's prefix and read
    their KV blocks; a cryptographic digest of the chain does not.
    """
    return hashlib.blake2b(msgspec.msgpack.encode(key), digest_size=16).digest()


class NoFreeBlocks(RuntimeError):
    """An allocation asked for more blocks than are free; the caller should have checked."""


def _extra(extra_keys: Sequence[Hashable | None] | None, i: int) -> Hashable | None:
    # Lenient on length: blocks past the list (e.g. generated text after the last image) have
    # no extra key.
    if extra_keys is None or i >= len(extra_keys):
        return None
    return extra_keys[i]


class BlockManager:
    """Block ids 0..num_blocks-1, each with a reference count and an optional cache key.

    The free list is FIFO: allocation takes from the front, and a block whose count drops to
    zero goes to the back, so the blocks freed longest ago (least likely to be hit again) are
    the first whose cached KV is overwritten.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        # Keyed by the full key: a lookup compares this block's tokens, and its parent digest
        # stands for everything before.
        self._cached: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list, front (next to be allocated) first; for tests and debugging."""
        return list(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def is_cached(self, block_id: int) -> bool:
        key = self._key[block_id]
        return key is not None and self._cached.get(key) == block_id

    # ---- prefix cache ------------------------------------------------------------------------

    def match_prefix(
        self, token_ids: Sequence[int], extra_keys: Sequence[Hashable | None] | None = None
    ) -> list[int]:
        """Block ids of the longest cached prefix of full blocks of `token_ids`; takes no refs.

        `extra_keys[i]` (if given) is mixed into block i's key, so blocks with equal tokens but
        different content behind them (two images with the same placeholder ids) don't match.
        """
        bs = self.block_size
        hits: list[int] = []
        parent: bytes | None = None
        for i in range(len(token_ids) // bs):
            key: BlockKey = (parent, tuple(token_ids[i * bs : (i + 1) * bs]), _extra(extra_keys, i))
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
            parent = self._hash[block]
        return hits

    def register_full_blocks(
        self,
        block_table: Sequence[int],
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_hashed_blocks: int,
        extra_keys: Sequence[Hashable | None] | None = None,
    ) -> int:
        """Register every full, computed block of a table past the first `num_hashed_blocks`.

        Returns the new count of hashed blocks (the caller keeps it as its cursor). Only call
        this once the KV of the first `num_computed_tokens` tokens really exists, or a later
        request would read garbage.
        """
        bs = self.block_size
        n_full = min(num_computed_tokens // bs, len(block_table))
        for i in range(num_hashed_blocks, n_full):
            parent = self._hash[block_table[i - 1]] if i > 0 else None
            key: BlockKey = (parent, tuple(token_ids[i * bs : (i + 1) * bs]), _extra(extra_keys, i))
            block = block_table[i]
            self._key[block] = key
            self._hash[block] = block_digest(key)
            # Two requests that computed the same prefix side by side: the first registered
            # block stays the canonical one; this one keeps its key (its children chain on it)
            # but is not findable.
            self._cached.setdefault(key, block)
        return max(num_hashed_blocks, n_full)

    # ---- allocation --------------------------------------------------------------------------

    def num_blocks_to_take(
        self, block_table: Sequence[int], num_tokens: int, cached: Sequence[int] = ()
    ) -> int:
        """How many free-list blocks `allocate` with the same arguments would consume.

        Cached prefix blocks count too when nobody holds them, since they sit on the free list.
        """
        fresh = max(0, self.blocks_for(num_tokens) - len(block_table) - len(cached))
        return fresh + sum(1 for b in cached if self.ref_counts[b] == 0)

    def can_allocate(
        self, block_table: Sequence[int], num_tokens: int, cached: Sequence[int] = ()
    ) -> bool:
        return self.num_blocks_to_take(block_table, num_tokens, cached) <= len(self._free)

    def allocate(
        self, block_table: list[int], num_tokens: int, cached: Sequence[int] = ()
    ) -> list[int]:
        """Grow `block_table` in place to cover `num_tokens` tokens; return the ids appended.

        `cached` (from `match_prefix`, only for an empty table) are taken first with one more
        reference each, then fresh blocks come from the front of the free list. All or nothing:
        raises NoFreeBlocks without changing anything when there are not enough free blocks.
        """
        if cached and block_table:
            raise ValueError("cached prefix blocks can only start an empty block table")
        need = self.num_blocks_to_take(block_table, num_tokens, cached)
        if need > len(self._free):
            raise NoFreeBlocks(f"need {need} blocks, {len(self._free)} free")
        start = len(block_table)
        for b in cached:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
            block_table.append(b)
        for _ in range(self.blocks_for(num_tokens) - len(block_table)):
            b, _ = self._free.popitem(last=False)
            self._drop_key(b)
            self.ref_counts[b] = 1
            block_table.append(b)
        return block_table[start:]

    def free(self, block_table: Sequence[int]) -> None:
        """Drop one reference on each block, last block first.

        Reverse order puts a sequence's tail ahead of its head on the free list, so the tail is
        overwritten first and the shared head (useful to more requests, and needed for any later
        block of the chain to match) stays cached longest.
        """
        for b in block_table:
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed while not in use (double free)")
        if len(set(block_table)) != len(block_table):
            raise ValueError(f"block table {list(block_table)} holds a block twice")
        for b in reversed(block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def _drop_key(self, block: int) -> None:
        key = self._key[block]
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
        self._key[block] = None
        self._hash[block] = None
