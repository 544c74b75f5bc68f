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

``row_topk_probs`` (and ``topk_into`` given ``probs``) also gives each winner's softmax
probability over its row, from the row the program already holds: the adaptive policy's
confidences for the price of the top-k.

``topk_into`` writes the winners of a sequential head's rows straight into the tree's node
columns of the proposal (the kernel's DEST mode), where an index and a concatenation were two
more launches per depth.

The winners are the same k values as torch.topk's; only among equal logits may a different id
win (the lowest index here; torch.topk does not define it). That changes which candidates are
proposed, never the output: the model verifies every candidate.
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.kernels import triton_applies

# Wider rows (a proposal over a full 49k or 128k vocabulary) would spill the registers a
# program holds its row in: torch.topk takes those. At 32,768 columns (a proposal vocabulary
# for Llama-3's 128k, as FR-Spec keeps) a program of 16 warps holds the row: 23 µs for 1-40
# rows against torch.topk's 36-50 (H100, bf16, k = 10, in CUDA graphs).
MAX_TRITON_COLS = 32768


def topk_kernel_applies(logits: torch.Tensor, k: int) -> bool:
    """Whether ``row_topk`` runs the Triton program on these logits (and ``topk_into`` may)."""
    return triton_applies(logits) and logits.shape[-1] <= MAX_TRITON_COLS and k <= logits.shape[-1]


def row_topk(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [..., V] → the ids [..., k] of each row's k largest values, largest first;
    ``vocab_ids`` [V] (optional) maps column j to token id vocab_ids[j]."""
    if topk_kernel_applies(logits, k):
        return _triton_topk(logits, k, vocab_ids)
    top = torch.topk(logits, k, dim=-1).indices
    return vocab_ids[top] if vocab_ids is not None else top


def row_topk_probs(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_topk``'s ids and each winner's softmax probability over its row [..., k] float32,
    exp(logit - logsumexp(row)) — the adaptive policy's confidences. On CUDA one Triton
    program per row computes both (no softmax over the vocabulary is materialised)."""
    if topk_kernel_applies(logits, k):
        probs = torch.empty((*logits.shape[:-1], k), dtype=torch.float32, device=logits.device)
        return _triton_topk(logits, k, vocab_ids, probs=probs.view(-1, k)), probs
    cols = torch.topk(logits, k, dim=-1).indices
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    probs = (logits.gather(-1, cols).float() - lse).exp()
    return (vocab_ids[cols] if vocab_ids is not None else cols), probs


def topk_into(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor], tokens: torch.Tensor,
              dest: torch.Tensor, probs: Optional[torch.Tensor] = None) -> None:
    """logits [S·P, V], P rows per sequence (a tree depth's parent nodes): winner i of row
    s·P + p (largest first) is written to tokens[s, dest[p, i]], unless dest[p, i] is -1 —
    and, given ``probs`` (float32, the shape and strides of ``tokens``), its softmax
    probability over the row to probs[s, dest[p, i]]. Only where ``topk_kernel_applies``."""
    if not topk_kernel_applies(logits, k):
        raise ValueError(f"topk_into: needs CUDA logits of at most {MAX_TRITON_COLS} columns")
    if probs is not None and (probs.shape != tokens.shape or probs.stride() != tokens.stride()
                              or probs.dtype != torch.float32):
        raise ValueError("topk_into: probs must be float32 with the shape and strides of tokens")
    _triton_topk(logits, k, vocab_ids, tokens, dest, probs)


def _triton_topk(logits: torch.Tensor, k: int, vocab_ids: Optional[torch.Tensor],
                 tokens: Optional[torch.Tensor] = None, dest: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    import triton

    from engine.kernels.topk import topk_rows_kernel

    shape = logits.shape
    x = logits.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, v = x.shape
    out = tokens if tokens is not None else torch.empty((rows, k), dtype=torch.long, device=x.device)
    if rows:
        block = triton.next_power_of_2(v)
        ids = vocab_ids if vocab_ids is not None else out  # a placeholder pointer when unmapped
        per_seq = dest.shape[0] if dest is not None else 1
        topk_rows_kernel[(rows,)](x, out, ids, dest if dest is not None else out, probs if probs is not None else out,
                                  v, x.stride(0), per_seq, out.stride(0), K=k, BLOCK=block,
                                  MAPPED=vocab_ids is not None, DEST=dest is not None, PROBS=probs is not None,
                                  num_warps=16 if block >= 32768 else 8 if block >= 4096 else 4)
    return out if tokens is not None else out.view(*shape[:-1], k)
