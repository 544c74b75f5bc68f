"""Typical acceptance as two Triton launches (engine/sample/tail.py ``SpecTail.sampled`` on CUDA,
for steps without top-k / top-p; imported only where Triton is).

Why: a T=0.7 typical decision at batch 1 was ~80 small kernels, 0.44 ms of a 64-node verify
step on an H100 against 0.06 ms for the greedy decision (profile_step): the processed
probabilities of the parent rows (gather, divide, softmax), the entropy and the threshold, the
candidates' gathers, cumprods and the path's key — launches, not bandwidth. (The bonus draw
after it is engine/kernels/keyed_sampling.py's.)

``typical_accept``: ``engine.sample.acceptance.typical_tree_accept`` from the logits — one
program per (sequence, parent row) for the row's max, softmax sum and entropy (H = log S -
E[x - max], one pass after the max), then one per sequence for the paths: a candidate is
accepted while p(x) = exp(x - max) / S at its parent exceeds min(epsilon, alpha * exp(-H));
the longest path wins, then the likeliest (the torch rule's float64 key, ties to the left).

The probabilities are float32 sums in another order than torch's softmax and entropy: a
comparison with the threshold can differ from the host rule's only where p lies within float32
rounding of it (~1e-7 relative; typical acceptance is not lossless to begin with). The GPU
test compares both on thousands of candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_max(row_ptr, vocab, inv_t, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for off in range(0, vocab, BLOCK_V):
        x = tl.load(row_ptr + off + offs, mask=off + offs < vocab, other=float("-inf")).to(tl.float32) * inv_t
        best = tl.maximum(best, x)
    return tl.max(best, axis=0)


@triton.jit
def _inverse_temperature(temp_ptr, s):
    """1 / sequence ``s``'s temperature; 1 for a greedy row (temperature 0), which keeps the
    greedy rule's answer and only must not divide by zero here."""
    t = tl.load(temp_ptr + s)
    return 1.0 / tl.where(t <= 0, 1.0, t)


@triton.jit
def typical_stats_kernel(logits_ptr, parent_nodes_ptr, temp_ptr, max_ptr, norm_ptr, thr_ptr, num_nodes,
                         num_parents, vocab, epsilon, alpha, BLOCK_V: tl.constexpr):
    s = tl.program_id(0)
    r = tl.program_id(1)
    row_ptr = logits_ptr + (s * num_nodes + tl.load(parent_nodes_ptr + r)) * vocab
    inv_t = _inverse_temperature(temp_ptr, s)
    offs = tl.arange(0, BLOCK_V)
    top = _row_max(row_ptr, vocab, inv_t, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    moment = tl.zeros([BLOCK_V], tl.float32)
    for off in range(0, vocab, BLOCK_V):
        live = off + offs < vocab
        z = tl.load(row_ptr + off + offs, mask=live, other=float("-inf")).to(tl.float32) * inv_t - top
        e = tl.where(live, tl.exp(z), 0.0)
        acc += e
        moment += tl.where(live, e * z, 0.0)
    norm = tl.sum(acc, axis=0)
    # -sum p log p with p = e / S, log p = z - log S: H = log S - sum(e z) / S.
    entropy = tl.log(norm) - tl.sum(moment, axis=0) / norm
    k = s * num_parents + r
    tl.store(max_ptr + k, top)
    tl.store(norm_ptr + k, norm)
    tl.store(thr_ptr + k, tl.minimum(alpha * tl.exp(-entropy), epsilon))


@triton.jit
def typical_paths_kernel(logits_ptr, tokens_ptr, paths_ptr, parent_row_ptr, temp_ptr, max_ptr, norm_ptr, thr_ptr,
                         best_ptr, n_acc_ptr, num_nodes, num_paths, num_parents, vocab,
                         DEPTH: tl.constexpr, BLOCK_P: tl.constexpr):
    s = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    live = p < num_paths
    inv_t = _inverse_temperature(temp_ptr, s)
    count = tl.zeros([BLOCK_P], dtype=tl.int32)
    loglik = tl.zeros([BLOCK_P], dtype=tl.float32)
    parent = tl.zeros([BLOCK_P], dtype=tl.int64)  # every path starts at the root (node 0)
    for d in tl.static_range(1, DEPTH + 1):
        node = tl.load(paths_ptr + p * (DEPTH + 1) + d, mask=live, other=-1)
        child = tl.maximum(node, 0)
        tok = tl.load(tokens_ptr + s * num_nodes + child, mask=live, other=0)
        k = s * num_parents + tl.load(parent_row_ptr + parent, mask=live, other=0)
        x = tl.load(logits_ptr + (s * num_nodes + parent) * vocab + tok, mask=live, other=0.0).to(tl.float32) * inv_t
        prob = tl.exp(x - tl.load(max_ptr + k, mask=live, other=0.0)) / tl.load(norm_ptr + k, mask=live, other=1.0)
        live = live & (node >= 0) & (prob > tl.load(thr_ptr + k, mask=live, other=1.0))
        count += live.to(tl.int32)
        loglik += tl.where(live, tl.log(tl.maximum(prob, 1e-30)), 0.0)
        parent = child
    # Longest first, then likeliest: the torch rule's float64 key; ties to the left.
    key = count.to(tl.float64) * 1e6 + loglik.to(tl.float64)
    key = tl.where(p < num_paths, key, float("-inf"))
    best = tl.argmax(key, axis=0, tie_break_left=True)
    tl.store(best_ptr + s, best.to(tl.int64))
    tl.store(n_acc_ptr + s, tl.max(tl.where(p == best, count, 0), axis=0).to(tl.int64))


def typical_accept(logits: torch.Tensor, tokens: torch.Tensor, paths: torch.Tensor, parent_nodes: torch.Tensor,
                   parent_row: torch.Tensor, temperature: torch.Tensor, epsilon: float,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``typical_tree_accept`` from logits [B*N, V] (sequence after sequence, the tree's N
    nodes each) at each sequence's temperature [B] (no top-k / top-p): tokens [B, N], paths,
    parent_nodes and parent_row the tree's, on the device. Returns the accepted path's index
    in ``paths`` and its accepted count, [B] each."""
    b, n = tokens.shape
    r = parent_nodes.shape[0]
    dev = logits.device
    temperature = temperature.float().contiguous()
    top, norm, thr = (torch.empty(b * r, dtype=torch.float32, device=dev) for _ in range(3))
    typical_stats_kernel[(b, r)](logits, parent_nodes, temperature, top, norm, thr, n, r, logits.shape[1],
                                 float(epsilon), float(alpha), BLOCK_V=2048, num_warps=8)
    best = torch.empty(b, dtype=torch.long, device=dev)
    n_acc = torch.empty(b, dtype=torch.long, device=dev)
    typical_paths_kernel[(b,)](logits, tokens, paths, parent_row, temperature, top, norm, thr, best, n_acc,
                               n, paths.shape[0], r, logits.shape[1], DEPTH=paths.shape[1] - 1,
                               BLOCK_P=max(16, triton.next_power_of_2(paths.shape[0])), num_warps=1)
    return best, n_acc
