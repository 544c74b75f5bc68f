"""The Triton program behind spec_decode/topk.py ``row_topk`` (imported only where Triton is)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_rows_kernel(x_ptr, out_ptr, ids_ptr, cols, stride_row, K: tl.constexpr, BLOCK: tl.constexpr,
                     MAPPED: tl.constexpr):
    """One program per row: the row in registers (float32), then K rounds of the largest value
    and its lowest column, written out and knocked out of the row."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + offs, mask=offs < cols, other=float("-inf")).to(tl.float32)
    # A NaN equals nothing, not even the maximum: count it as -inf (heads' logits are finite).
    x = tl.where(x == x, x, float("-inf"))
    for i in tl.static_range(K):
        best = tl.max(x, axis=0)
        col = tl.min(tl.where((x == best) & (offs < cols), offs, BLOCK), axis=0)
        col = tl.minimum(col, cols - 1)  # never out of the row, whatever the values
        x = tl.where(offs == col, float("-inf"), x)
        if MAPPED:
            tl.store(out_ptr + row * K + i, tl.load(ids_ptr + col))
        else:
            tl.store(out_ptr + row * K + i, col.to(tl.int64))
