"""Host-side KV block bookkeeping: a block pool with reference counts and prefix caching.

Nothing here touches device arrays. The device pool holds ``num_blocks`` pages;
this module decides which page holds which tokens.

* :class:`BlockPool` — per-block reference counts, a free queue in
  least-recently-freed order, and the prefix cache: a map from a full block's
  hash to the block that holds those tokens. A freed block keeps its contents
  and hash, stays findable, and is only evicted (its hash forgotten) when the
  free queue hands it out again — so eviction is LRU.
* :class:`KVCacheManager` — block tables per sequence on top of the pool:
  admit a sequence reusing its longest cached prefix, grow it, register newly
  full blocks, free it.

Block hashes form a chain, ``hash((parent_hash, block_tokens))``, so a block
is only reused when the whole prefix before it matches (the paper's "cache
sharing and reuse"; vLLM's automatic prefix caching).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a partial last block has none)."""
    hashes, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """Reference-counted blocks with an LRU free queue and a prefix cache.

    Invariants (checked by :meth:`check`): every block is either in use
    (ref_count > 0) or in the free queue, never both; a cached hash maps to a
    block whose ``block_hash`` is that hash.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[Optional[int]] = [None] * num_blocks
        self.free_queue: collections.OrderedDict[int, None] = collections.OrderedDict(
            (b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks in the free queue (cached blocks that may be evicted included)."""
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        """Blocks held by requests (not in the free queue)."""
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """Take the least recently freed block (evicting its cached contents)."""
        if not self.free_queue:
            raise RuntimeError("no free KV blocks")
        block, _ = self.free_queue.popitem(last=False)
        if self.block_hash[block] is not None:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.evictions += 1
        self.ref_count[block] = 1
        return block

    def lookup(self, block_hash: int) -> Optional[int]:
        """The block id cached under ``block_hash``, or None (always None with prefix
        caching off)."""
        return self.cached.get(block_hash) if self.enable_prefix_caching else None

    def acquire(self, block: int) -> None:
        """Add a holder to a block (a prefix-cache hit), taking it off the free queue if idle."""
        if self.ref_count[block] == 0:
            del self.free_queue[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        """Drop a holder; an unheld block joins the free queue, keeping its cached contents."""
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"block {block} released more often than acquired")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free_queue[block] = None

    def register(self, block: int, block_hash: int) -> None:
        """Record that `block` holds the full block with `block_hash`."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:  # the same tokens already live in another block
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def check(self) -> None:
        """Assert the invariants (used by the property tests)."""
        for b in range(self.num_blocks):
            assert self.ref_count[b] >= 0
            assert (self.ref_count[b] == 0) == (b in self.free_queue), b
        for h, b in self.cached.items():
            assert self.block_hash[b] == h


class KVCacheManager:
    """Block tables of live sequences over a :class:`BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[str, list[int]] = {}
        self.num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` tokens occupy (rounded up)."""
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids`, leaving at least one token
        to compute (its logits are needed to sample the next token)."""
        blocks = []
        for h in block_hashes(token_ids[:max(0, len(token_ids) - 1)], self.block_size):
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def admit(self, seq_id: str, token_ids: Sequence[int], num_tokens: int,
              use_cache: bool = True) -> Optional[int]:
        """Give `seq_id` blocks for its first `num_tokens` tokens, reusing cached ones (unless
        `use_cache` is False: then every token is computed; its blocks still enter the cache).

        Returns the number of tokens found in the prefix cache (already computed),
        or None if the pool lacks free blocks (nothing is changed then).
        """
        if seq_id in self.tables:
            raise RuntimeError(f"sequence {seq_id!r} already holds blocks")
        hits = self.cached_prefix(token_ids) if use_cache else []
        num_cached = len(hits) * self.block_size
        fresh = self.blocks_needed(max(num_tokens, num_cached)) - len(hits)
        # cached blocks that sit idle in the free queue cannot also be counted as free
        idle_hits = sum(1 for b in hits if self.pool.ref_count[b] == 0)
        if fresh > self.pool.num_free - idle_hits:
            return None
        for b in hits:
            self.pool.acquire(b)
        self.tables[seq_id] = hits + [self.pool.allocate() for _ in range(fresh)]
        self.num_registered[seq_id] = len(hits)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_cached
        return num_cached

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in total; False (unchanged) if blocks run out."""
        table = self.tables[seq_id]
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > self.pool.num_free:
            return False
        table.extend(self.pool.allocate() for _ in range(max(0, extra)))
        return True

    def has_unregistered_full_blocks(self, seq_id: str, num_computed: int) -> bool:
        """Whether :meth:`register_full_blocks` would register anything (a cheap check, so
        callers build the token list only when a block has filled)."""
        return (self.pool.enable_prefix_caching
                and num_computed // self.block_size > self.num_registered[seq_id])

    def register_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Enter the blocks completely filled by computed tokens into the prefix cache."""
        if not self.pool.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        full = min(num_computed // self.block_size, len(table))
        start = self.num_registered[seq_id]
        if full <= start:
            return
        hashes = block_hashes(token_ids[:full * self.block_size], self.block_size)
        for i in range(start, full):
            self.pool.register(table[i], hashes[i])
        self.num_registered[seq_id] = full

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks, tail first (so its last blocks are evicted first)."""
        for b in reversed(self.tables.pop(seq_id)):
            self.pool.release(b)
        del self.num_registered[seq_id]

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the pool's free queue (:attr:`BlockPool.num_free`)."""
        return self.pool.num_free
