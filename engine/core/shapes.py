"""Step shapes in plain integers: ceil division, and the batch buckets a step's sequences are
padded to — where the worker captures its CUDA graphs and the attention sizes its split-K (so a
replayed step and the same step run eagerly split alike)."""

from __future__ import annotations

import math
from typing import Optional

# Padded batch sizes a graph is captured for (vLLM-like: dense at small batches).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0)."""
    return -(-a // b)


def padded_batch(batch: int) -> Optional[int]:
    """The bucket a batch of ``batch`` sequences runs in, or None if it is larger than any."""
    return next((b for b in BATCH_BUCKETS if b >= batch), None)


# Adaptive trees (engine/core/adaptive.py): the tree nodes a step of a batch bucket may verify,
# in nodes a sequence on average. Each is a ragged-step CUDA graph's capacity
# (``ragged_tokens``), and the adaptive plan chooses among exactly these, so a step fills its
# graph and pays for no padding tokens.
RAGGED_NODES_PER_SEQ = (0, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def ragged_tokens(batch: int, nodes: int, max_tokens: int) -> list[int]:
    """The token counts of the ragged steps of batch bucket ``batch`` whose graphs the worker
    captures: ``batch`` pending tokens plus ``ceil(batch * x)`` tree nodes for each x of
    ``RAGGED_NODES_PER_SEQ``, at most ``nodes - 1`` a sequence (``nodes``: the full tree's,
    root included) and ``max_tokens`` in all (the step's token budget), ascending."""
    cap = min(max_tokens, batch * nodes)
    counts = {batch + math.ceil(batch * x) for x in RAGGED_NODES_PER_SEQ}
    return sorted({t for t in counts if t <= cap} | ({cap} if cap >= batch else set()))
