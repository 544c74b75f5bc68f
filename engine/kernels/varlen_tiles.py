"""The varlen attention kernel's query tiling (engine/kernels/varlen_attention.py), free of
Triton: the host counts a step's tiles (``tile_starts``) with the rest of its lengths, graph or
eager, on machines without Triton too."""

from __future__ import annotations

from engine.core.shapes import cdiv

# Query tokens per program of the varlen kernel, each with the query heads of one KV head.
TILE_TOKENS = 16


def tile_starts(q_lens: list[int]) -> list[int]:
    """Each sequence's first query tile, then the step's tile count ([S + 1]): a sequence of
    ``q_len`` tokens takes ``cdiv(q_len, TILE_TOKENS)`` tiles (none for a padding sequence)."""
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + cdiv(n, TILE_TOKENS))
    return starts


def max_tiles(tokens: int, seqs: int) -> int:
    """The most tiles a step of ``tokens`` tokens over ``seqs`` sequences can need (each
    sequence's last tile may be partial): the kernel's grid, fixed for a captured graph."""
    return cdiv(tokens, TILE_TOKENS) + seqs
