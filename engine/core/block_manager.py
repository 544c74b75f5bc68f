"""Paged KV blocks: per-sequence block tables over a pool of blocks, and automatic prefix
caching.

A block full of committed tokens (their K/V computed and final) gets an identity: the SHA-256
of its parent block's identity and its token ids, the chain rooted in the request's cache salt
(tenants with different salts never share a block; a predictable hash would let one plant K/V
another reads, vllm GHSA-rm76-4mrf-v9r8). Such a block is shared by every sequence whose
tokens reach the same identity, with a reference count; freed, it stays cached and evictable,
the least recently freed first (vLLM V1's scheme: hashed full blocks, reference counts, an LRU
of free blocks). Only request blocks are ever cached — never the pad block or the scratch rows
a tree's candidates are written to, never a partial block — and a sequence never writes into a
shared block: a prefix hit stops before the sequence's last token (which must be computed: its
logits and hidden state start generation and Medusa's first proposal), and every later
position lies in blocks of the sequence's own.

No tensors here: the driver owns the tables; workers only see block ids.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional, Sequence

from engine.core.shapes import cdiv


def extend_block_hashes(hashes: list[bytes], tokens: Sequence[int], num_blocks: int, block_size: int,
                        salt: Optional[str]) -> list[bytes]:
    """Grow ``hashes`` (in place; returned) to the identities of the first ``num_blocks`` full
    blocks of ``tokens``: block i's is SHA-256(block i-1's identity + its token ids), block
    0's parent the salt's root."""
    parent = hashes[-1] if hashes else hashlib.sha256(b"medusa-engine prefix cache\0" + (salt or "").encode()).digest()
    for i in range(len(hashes), num_blocks):
        parent = hashlib.sha256(parent + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()).digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager: num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_prefix_caching
        # Free blocks, least recently freed first: allocation takes from the front, so a
        # cached block is evicted as late as possible. (Insertion order of a dict.)
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._ref = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._hash_of: dict[int, bytes] = {}  # block → its identity (cached blocks only)
        self._cached: dict[bytes, int] = {}  # identity → block
        # Per sequence: how many of its first blocks are registered.
        self._registered: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can be given now (free, cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def num_missing(self, seq_id: int, num_tokens: int) -> int:
        """Blocks that must still be allocated for ``seq_id`` to hold ``num_tokens`` slots."""
        return max(0, self.blocks_needed(num_tokens) - len(self._tables.get(seq_id, ())))

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table of ``seq_id`` to hold ``num_tokens`` slots. False (and no change) if short."""
        missing = self.num_missing(seq_id, num_tokens)
        if missing > len(self._free):
            return False
        table = self._tables.setdefault(seq_id, [])
        for _ in range(missing):
            table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        identity = self._hash_of.pop(block, None)  # evicted: its K/V is about to be overwritten
        if identity is not None:
            del self._cached[identity]
        self._ref[block] = 1
        return block

    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id`` (a cached one stays cached until evicted); freeing
        an unknown sequence is a no-op."""
        self._registered.pop(seq_id, None)
        # The table's tail first: its blocks are the least likely to be shared, and are evicted first.
        for block in reversed(self._tables.pop(seq_id, [])):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None

    # ---- prefix caching ---------------------------------------------------------------
    def num_registered(self, seq_id: int) -> int:
        """How many of the sequence's first blocks are registered in the cache."""
        return self._registered.get(seq_id, 0)

    def lookup(self, identities: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``identities`` (``extend_block_hashes``)."""
        hits = []
        for identity in identities if self.caching else ():
            block = self._cached.get(identity)
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_to_admit(self, hits: list[int], num_tokens: int) -> int:
        """Free blocks that admitting a sequence whose prefix is ``hits`` and that must hold
        ``num_tokens`` slots takes: its new blocks, and the hits nobody references (they leave
        the free pool)."""
        return max(0, self.blocks_needed(num_tokens) - len(hits)) + sum(1 for b in hits if self._ref[b] == 0)

    def admit(self, seq_id: int, hits: list[int], num_tokens: int) -> bool:
        """Give a new (or preempted) sequence its cached prefix ``hits`` (``lookup``) and blocks
        for ``num_tokens`` slots in all. False (and no change) if short."""
        if seq_id in self._tables or self.blocks_to_admit(hits, num_tokens) > len(self._free):
            return False
        for block in hits:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        self._tables[seq_id] = list(hits)
        self._registered[seq_id] = len(hits)
        return self.allocate(seq_id, num_tokens)

    def register(self, seq_id: int, identities: Sequence[bytes]) -> None:
        """The sequence's first ``len(identities)`` blocks are full of committed tokens (their
        final K/V), with these identities: cache the ones not registered yet. A block whose
        identity is cached already (another sequence computed the same prefix) stays the
        sequence's own."""
        if not self.caching:
            return
        table = self._tables.get(seq_id, [])
        done = self.num_registered(seq_id)
        for i in range(done, min(len(identities), len(table))):
            block, identity = table[i], identities[i]
            if identity not in self._cached and block not in self._hash_of:
                self._cached[identity] = block
                self._hash_of[block] = identity
        self._registered[seq_id] = max(done, min(len(identities), len(table)))

    def reset_cache(self) -> bool:
        """Forget every cached identity (benchmarks start each replay cold). Only while no
        sequence holds a block: False, and nothing forgotten, otherwise."""
        if self._tables:
            return False
        self._cached.clear()
        self._hash_of.clear()
        return True

    def check_invariants(self) -> None:
        """Every block is free (reference count 0) or owned, its count the number of tables
        holding it; the cache maps identities and blocks one to one (tests call this)."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                counts[b] += 1
        if counts != self._ref:
            raise AssertionError("block accounting broken: reference counts differ from the tables")
        free = set(self._free)
        if len(free) != len(self._free) or free != {b for b in range(self.num_blocks) if counts[b] == 0}:
            raise AssertionError(f"block accounting broken: {len(self._free)} free blocks, "
                                 f"{sum(c == 0 for c in counts)} unowned")
        if len(self._cached) != len(self._hash_of) or any(self._hash_of.get(b) != h for h, b in self._cached.items()):
            raise AssertionError("prefix cache broken: identities and blocks are not one to one")
