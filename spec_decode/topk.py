"""The heads' top-k: each row's k largest logits' token ids, largest first.

A Medusa proposal takes the top-k (k = the tree's widest rank, 10 for mc_sim_7b_63) of every
head row over the proposal vocabulary (8,192 ids for the bundled heads). torch.topk runs a
radix select with one thread block per row, then a sort of the k winners: 31.7 µs for one row
and 42 µs for 23 rows on an H100 (bf16, 8,192 columns) — with sequential heads four such calls
per step, 0.13 ms of the bundled model's 0.30 ms proposal at batch 1 (profile_step --kernels).

``row_topk`` on CUDA, for rows of at most ``MAX_TRITON_COLS`` columns, is one Triton program
per row instead: the row sits in registers, and k rounds of (max with its index, knock it out)
give the winners already in order. The ids can be mapped through the proposal vocabulary in
the same kernel (the gather ``vocab_ids[top]`` was one more launch per depth). With the
mapping, in CUDA graphs: 9.7 µs for one row, 9.9 for 23, 70 for 1,472, against torch.topk plus
the gather's 36, 45 and 138; the proposal at batch 1 0.30 → 0.20 ms.

The winners are the same k values as torch.topk's; only among equal logits may a different id
win (the lowest index here; torch.topk does not define it). That changes which candidates are
proposed, never the output: the model verifies every candidate.
"""

from __future__ import annotations

from typing import Optional

import torch

# Wider rows (a proposal over a full 49k or 128k vocabulary) would spill the registers a
# program holds its row in: torch.topk takes those.
MAX_TRITON_COLS = 16384


def row_topk(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [..., V] → the ids [..., k] of each row's k largest values, largest first;
    ``vocab_ids`` [V] (optional) maps column j to token id vocab_ids[j]."""
    v = logits.shape[-1]
    # On CUDA Triton is there: the engine's attention backend and cache write need it already.
    if logits.is_cuda and v <= MAX_TRITON_COLS and k <= v:
        return _triton_topk(logits, k, vocab_ids)
    top = torch.topk(logits, k, dim=-1).indices
    return vocab_ids[top] if vocab_ids is not None else top


def _triton_topk(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor]) -> torch.Tensor:
    import triton

    from spec_decode.topk_kernel import topk_rows_kernel

    shape = logits.shape
    x = logits.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, v = x.shape
    out = torch.empty((rows, k), dtype=torch.long, device=x.device)
    if rows:
        block = triton.next_power_of_2(v)
        ids = vocab_ids if vocab_ids is not None else out  # a placeholder pointer when unmapped
        topk_rows_kernel[(rows,)](x, out, ids, v, x.stride(0), K=k, BLOCK=block, MAPPED=vocab_ids is not None,
                                  num_warps=8 if block >= 4096 else 4)
    return out.view(*shape[:-1], k)
