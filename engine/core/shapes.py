"""Step shapes in plain integers: ceil division, and the batch buckets a step's sequences are
padded to — where the worker captures its CUDA graphs and the attention sizes its split-K (so a
replayed step and the same step run eagerly split alike)."""

from __future__ import annotations

from typing import Optional

# Padded batch sizes a graph is captured for (vLLM-like: dense at small batches).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (b > 0)."""
    return -(-a // b)


def padded_batch(batch: int) -> Optional[int]:
    """The bucket a batch of ``batch`` sequences runs in, or None if it is larger than any."""
    return next((b for b in BATCH_BUCKETS if b >= batch), None)
