"""A verify step's decision as Triton launches (engine/sample/tail.py ``SpecTail`` on CUDA;
imported only where Triton is).

``greedy_decide``: after the lm_head's argmax, ``greedy_tree_accept`` (edges, compare, cumprod,
sum, argmax), the gathers of the accepted path, its tokens and the bonus token, the commit's
destination slots (block-table lookups, the pad slot for rejected depths) and the row's
concatenation were ~35 small kernels of integer work on a few hundred values — 0.24 ms of a
64-node verify step at batch 1 on an H100 against 0.05 ms for a plain step's argmax tail
(profile_step, 43 kernels), at any batch size. Here one program per sequence does it all with
its tree's paths in registers; the commit's copy itself stays one indexed copy per K and V.
A ragged step (adaptive trees: ``SpecTail.greedy_ragged``) runs the same program on its
tokens scattered into the full tree's node space, each node's step row read from ``flat_row``.

``commit_rows``: the same end for a decision made otherwise (the sampled rules give each
sequence's path, accepted count and bonus token): the rows and the commit's slots in one
launch instead of ~15.

The same decision as the torch path: along every root-to-leaf path a candidate is accepted
while it equals the argmax at its parent; the first longest path wins (``tl.argmax`` breaks
ties to the left, as torch.argmax does); its unaccepted depths are read as the torch path
reads them (node ids clamped at 0) and committed to the pad slot, which no request reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _commit_row(s, path_row, n_acc, tokens_ptr, start_ptr, tables_ptr, rows_ptr, src_ptr, dst_ptr, flat_ptr,
                num_nodes, table_width, block_size, pad_slot, scratch0, DEPTH: tl.constexpr, FLAT: tl.constexpr):
    """Sequence ``s``'s row but its bonus token (count, the path's tokens, the proposal row)
    and its commit's slots, from its path (``path_row``: DEPTH + 1 node ids, root first, -1
    read as 0) and accepted count. Returns the last accepted node. A node's row of the step
    is s * num_nodes + node (a uniform step), or with FLAT ``flat_ptr``'s [B, N] entry (a
    ragged step's: each sequence only some of the full tree's nodes)."""
    row = rows_ptr + s * (DEPTH + 3)
    last = tl.zeros([], dtype=tl.int64)
    start = tl.load(start_ptr + s)
    limit = table_width * block_size - 1
    for d in tl.static_range(1, DEPTH + 1):
        node = tl.maximum(tl.load(path_row + d), 0)
        tl.store(row + d, tl.load(tokens_ptr + s * num_nodes + node))
        last = tl.where(d == n_acc, node, last)
        # The node accepted at depth d goes to position start + d; rejected ones to the pad slot.
        pos = tl.minimum(start + d, limit)
        block = tl.load(tables_ptr + s * table_width + pos // block_size)
        slot = tl.where(d <= n_acc, block * block_size + pos % block_size, pad_slot)
        if FLAT:
            flat = tl.load(flat_ptr + s * num_nodes + node)
        else:
            flat = s * num_nodes + node
        tl.store(src_ptr + s * DEPTH + d - 1, scratch0 + flat)
        tl.store(dst_ptr + s * DEPTH + d - 1, slot)
    tl.store(row, n_acc.to(tl.int64))
    if FLAT:
        tl.store(row + DEPTH + 2, tl.load(flat_ptr + s * num_nodes + last))
    else:
        tl.store(row + DEPTH + 2, s * num_nodes + last)
    return last


@triton.jit
def greedy_decide_kernel(tokens_ptr, argmax_ptr, paths_ptr, start_ptr, tables_ptr, rows_ptr, src_ptr, dst_ptr,
                         flat_ptr, num_nodes, num_paths, table_width, block_size, pad_slot, scratch0,
                         DEPTH: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr):
    s = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    live = p < num_paths
    stride = DEPTH + 1
    count = tl.zeros([BLOCK_P], dtype=tl.int32)
    parent = tl.zeros([BLOCK_P], dtype=tl.int64)  # every path starts at the root (node 0)
    for d in tl.static_range(1, DEPTH + 1):
        node = tl.load(paths_ptr + p * stride + d, mask=live, other=-1)
        child = tl.maximum(node, 0)
        tok = tl.load(tokens_ptr + s * num_nodes + child, mask=live, other=-1)
        want = tl.load(argmax_ptr + s * num_nodes + parent, mask=live, other=-2)
        live = live & (node >= 0) & (tok == want)
        count += live.to(tl.int32)
        parent = child
    n_acc = tl.max(count, axis=0)
    best = tl.argmax(count, axis=0, tie_break_left=True)
    last = _commit_row(s, paths_ptr + best * stride, n_acc, tokens_ptr, start_ptr, tables_ptr, rows_ptr, src_ptr,
                       dst_ptr, flat_ptr, num_nodes, table_width, block_size, pad_slot, scratch0, DEPTH, FLAT)
    tl.store(rows_ptr + s * (DEPTH + 3) + DEPTH + 1, tl.load(argmax_ptr + s * num_nodes + last))


@triton.jit
def commit_rows_kernel(tokens_ptr, path_ptr, n_acc_ptr, bonus_ptr, start_ptr, tables_ptr, rows_ptr, src_ptr,
                       dst_ptr, num_nodes, table_width, block_size, pad_slot, scratch0, DEPTH: tl.constexpr):
    s = tl.program_id(0)
    _commit_row(s, path_ptr + s * (DEPTH + 1), tl.load(n_acc_ptr + s), tokens_ptr, start_ptr, tables_ptr, rows_ptr,
                src_ptr, dst_ptr, tokens_ptr, num_nodes, table_width, block_size, pad_slot, scratch0, DEPTH, False)
    tl.store(rows_ptr + s * (DEPTH + 3) + DEPTH + 1, tl.load(bonus_ptr + s))


def _outputs(b: int, depth: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((b, depth + 3), dtype=torch.long, device=device),
            torch.empty((b, depth), dtype=torch.long, device=device),
            torch.empty((b, depth), dtype=torch.long, device=device))


def greedy_decide(tokens: torch.Tensor, argmax: torch.Tensor, paths: torch.Tensor, start: torch.Tensor,
                  tables: torch.Tensor, block_size: int, pad_slot: int, scratch0: int,
                  flat_row: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, argmax [B, N] int64, paths [P, depth + 1] (-1 padded), start [B] the pending
    token's position, tables [B, W] int64 → (rows [B, depth + 3]: accepted count, the accepted
    path's tokens, the bonus token, the hidden row of the last accepted node — ``SpecTail.greedy``'s
    rows; src, dst [B, depth]: the commit's scratch and destination slots). ``flat_row`` [B, N]
    int64: each node's row of the step (a ragged step's, ``SpecTail.greedy_ragged``); None:
    node i of sequence b is row b * N + i."""
    b, n = tokens.shape
    depth = paths.shape[1] - 1
    rows, src, dst = _outputs(b, depth, tokens.device)
    flat = flat_row is not None
    greedy_decide_kernel[(b,)](tokens, argmax, paths, start, tables, rows, src, dst,
                               flat_row.contiguous() if flat else tokens, n, paths.shape[0], tables.shape[1],
                               block_size, pad_slot, scratch0, DEPTH=depth,
                               BLOCK_P=max(16, triton.next_power_of_2(paths.shape[0])), FLAT=flat, num_warps=1)
    return rows, src, dst


def commit_rows(tokens: torch.Tensor, path: torch.Tensor, n_acc: torch.Tensor, bonus: torch.Tensor,
                start: torch.Tensor, tables: torch.Tensor, block_size: int, pad_slot: int,
                scratch0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_decide``'s outputs for a decision already made: each sequence's path [B, depth + 1]
    (root first, -1 padded), accepted count [B] and bonus token [B]."""
    b, n = tokens.shape
    depth = path.shape[1] - 1
    rows, src, dst = _outputs(b, depth, tokens.device)
    commit_rows_kernel[(b,)](tokens, path.contiguous(), n_acc.contiguous(), bonus.contiguous(), start, tables, rows,
                             src, dst, n, tables.shape[1], block_size, pad_slot, scratch0, DEPTH=depth, num_warps=1)
    return rows, src, dst
