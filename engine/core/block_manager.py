"""Paged KV block allocator: a free list, per-sequence block tables, leak/double-free checks."""

from __future__ import annotations

from engine.core.shapes import cdiv


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager: num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

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
            table.append(self._free.pop())
        return True

    def free(self, seq_id: int) -> None:
        """Return every block of ``seq_id``; freeing an unknown sequence is a no-op."""
        for block in reversed(self._tables.pop(seq_id, [])):
            self._free.append(block)

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one sequence (tests call this)."""
        owned = [b for table in self._tables.values() for b in table]
        all_blocks = owned + self._free
        if len(all_blocks) != self.num_blocks or set(all_blocks) != set(range(self.num_blocks)):
            raise AssertionError(
                f"block accounting broken: {len(owned)} owned + {len(self._free)} free "
                f"!= {self.num_blocks}, or a block is owned twice"
            )
