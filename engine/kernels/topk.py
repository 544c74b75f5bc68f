"""The Triton program behind engine/spec/topk.py ``row_topk`` and ``topk_into`` (imported only
where Triton is)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_rows_kernel(x_ptr, out_ptr, ids_ptr, dest_ptr, probs_ptr, cols, stride_row, rows_per_seq, stride_out,
                     K: tl.constexpr, BLOCK: tl.constexpr, MAPPED: tl.constexpr, DEST: tl.constexpr,
                     PROBS: tl.constexpr):
    """One program per row: the row in registers (float32), then K rounds of the largest value
    and its lowest column (one argmax), written out and knocked out of the row. Without DEST
    winner i of row r goes to out[r, i]; with DEST row r = s·rows_per_seq + p puts winner i at
    out[s, dest[p, i]] (skipped where dest is -1): a sequential head's top-k lands in the
    tree's node columns. With PROBS each winner's softmax probability over the row,
    exp(logit - logsumexp(row)), goes to probs_ptr at the winner's place in out (same layout
    and strides): the row is in registers already, so its logsumexp costs two reductions,
    where torch read the logits again in five launches (a float copy, max, exp, sum, log)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + offs, mask=offs < cols, other=float("-inf")).to(tl.float32)
    # A NaN equals nothing, not even the maximum: count it as -inf (heads' logits are finite).
    x = tl.where(x == x, x, float("-inf"))
    if PROBS:
        top = tl.max(x, axis=0)
        lse = top + tl.log(tl.sum(tl.exp(x - top), axis=0))
    for i in tl.static_range(K):
        # One reduction a round (the first column of the maximum), not a max and then a min
        # over the columns that hold it.
        col = tl.argmax(x, axis=0, tie_break_left=True)
        col = tl.minimum(col, cols - 1)  # never out of the row, whatever the values
        if PROBS:  # the winner's logit, one load (cheaper than one more reduction over the row)
            prob = tl.exp(tl.load(x_ptr + row * stride_row + col).to(tl.float32) - lse)
        x = tl.where(offs == col, float("-inf"), x)
        token = col.to(tl.int64)
        if MAPPED:
            token = tl.load(ids_ptr + col)
        if DEST:
            node = tl.load(dest_ptr + (row % rows_per_seq) * K + i)
            at = (row // rows_per_seq) * stride_out + node
            tl.store(out_ptr + at, token, mask=node >= 0)
            if PROBS:
                tl.store(probs_ptr + at, prob, mask=node >= 0)
        else:
            tl.store(out_ptr + row * K + i, token)
            if PROBS:
                tl.store(probs_ptr + row * K + i, prob)
