"""One Triton kernel for a Medusa verify step's attention: the paged prefix and the tree.

Every sequence of a uniform tree step has N query tokens (its pending token, the root, then one
per candidate). Each attends to (a) its whole prefix in the paged cache — positions before the
root, read through the block table — and (b) the step's own N tokens under the tree's ancestor
mask. xformers' ``tree_attention`` does this as two split-K attentions (prefix, suffix), each
with its own reduction, then a log-sum-exp merge: five launches per layer, which on a small
model at batch 1 cost more than the attention's arithmetic (issue 15's profile: a 64-node
verify forward 0.52 ms over a plain one, 30 layers). Here one program streams the prefix and
then the tree through a single online softmax (FlashAttention's running max and sum), so the
merge is the loop itself. Measured (H100, bf16, bundled model, 256 tokens of context): the
verify forward 1.56 → 1.31 ms at batch 1 (plain 1.04), 3.28 → 1.98 at 16, 7.17 → 4.67 at 64.

Grid: (sequence × KV head, blocks of query rows). Grouped-query attention reads each K/V tile
once for all the query heads that share it: a program's rows are (node, query head of this KV
head) pairs, node-major, so a 64-node tree of a model with 3 query heads per KV head is 192
rows = 3 programs per (sequence, KV head).

Split-K over the prefix when the grid is small: at batch 1 the bundled model's grid is 9
programs on an H100's 132 SMs, each walking its whole prefix tile after tile (a 4k-token
prefix: 64 sequential tiles). With ``splits`` > 1 a third grid axis cuts the prefix's tiles
into that many runs (sized on the device from each sequence's length, so one captured graph
serves every length); the last run also takes the tree. Each run leaves its running max, sum
and unnormalised output, and ``_merge_splits_kernel`` folds them (the log-sum-exp merge of
flash-decoding). ``default_splits`` sizes them from the grid of the step's batch bucket
(static per graph; the attention backend passes the bucket, so that an eager step splits as
its graph would); at batch 16 and more the grid fills the device and no split is made.

What it leaves out, on purpose: causal prefill chunks and plain decode tokens (xformers'
kernels keep those).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from engine.kernels.online_softmax import online_softmax_step, paged_kv_tile

BLOCK_M = 64  # query rows ((node, head) pairs) per program


@triton.jit
def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, kv_lens_ptr, mask_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch, stride_ot, stride_oh,
        stride_tb, scale, part_m_ptr, part_l_ptr, part_acc_ptr, total_rows, q_starts_ptr,
        NODES: tl.constexpr, REP: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
        RAGGED: tl.constexpr):
    seq_head = tl.program_id(0)
    split = tl.program_id(2)
    b = seq_head // KV_HEADS
    g = seq_head % KV_HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if RAGGED:  # each sequence its own tree: its rows from q_starts, its mask [NODES, NODES] of its own
        first = tl.load(q_starts_ptr + b)
        n_b = tl.load(q_starts_ptr + b + 1) - first
        mask_ptr = mask_ptr + b * NODES * NODES
        if tl.program_id(1) * BLOCK_M >= n_b * REP:  # past this sequence's (smaller) tree
            return
    else:
        first = b * NODES  # the sequence's first flat row (its root)
        n_b = NODES
    row_ok = rows < n_b * REP
    node = tl.where(row_ok, rows // REP, 0)
    head = g * REP + rows % REP
    dims = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + (first + node)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    # Scores in base 2: exp2 is one instruction, exp is not.
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # (a) The paged prefix: every position before the root is visible to every node.
    kv_len = tl.load(kv_lens_ptr + b)
    cols = tl.arange(0, BLOCK_N)
    # This run's tiles of the prefix (all of them without split-K).
    per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), SPLITS) * BLOCK_N
    for start in range(split * per_split, tl.minimum(kv_len, (split + 1) * per_split), BLOCK_N):
        pos = start + cols
        ok = pos < kv_len
        kt, vt = paged_kv_tile(kc_ptr, vc_ptr, tables_ptr + b * stride_tb, pos, ok, g, stride_ct, stride_ch, dims,
                               PAGE)
        s = tl.where(ok[None, :], tl.dot(q, kt) * qk_scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)

    # (b) The tree: the step's own K/V, each node seeing its ancestors and itself (the root
    # sees itself, so no row is ever all masked).
    if split == SPLITS - 1:  # the last run takes the tree
        for start in range(0, n_b, BLOCK_N):
            j = start + cols
            ok = j < n_b
            kt = tl.load(k_ptr + (first + j)[None, :] * stride_kt + g * stride_kh + dims[:, None],
                         mask=ok[None, :], other=0.0)
            visible = tl.load(mask_ptr + node[:, None] * NODES + j[None, :], mask=row_ok[:, None] & ok[None, :],
                              other=0)
            s = tl.where(visible != 0, tl.dot(q, kt) * qk_scale, float("-inf"))
            vt = tl.load(v_ptr + (first + j)[:, None] * stride_vt + g * stride_vh + dims[None, :], mask=ok[:, None],
                         other=0.0)
            m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)

    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + (first + node)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:  # this run's share, for _merge_splits_kernel: [split, flat row * heads + head]
        r = split * total_rows + (first + node) * (KV_HEADS * REP) + head
        tl.store(part_m_ptr + r, m_i, mask=row_ok)
        tl.store(part_l_ptr + r, l_i, mask=row_ok)
        tl.store(part_acc_ptr + r[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, total_rows, stride_ot, stride_oh,
                         HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), M = max_s m_s (base-2 scores)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < total_rows
    dims = tl.arange(0, HEAD_DIM)
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(part_m_ptr + s * total_rows + r, mask=ok, other=float("-inf")))
    top = tl.where(ok, top, 0.0)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.math.exp2(tl.load(part_m_ptr + s * total_rows + r, mask=ok, other=float("-inf")) - top)
        total += w * tl.load(part_l_ptr + s * total_rows + r, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(part_acc_ptr + (s * total_rows + r)[:, None] * HEAD_DIM + dims[None, :],
                                    mask=ok[:, None], other=0.0)
    out = acc / tl.where(ok, total, 1.0)[:, None]
    tok, head = r // HEADS, r % HEADS
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@functools.lru_cache(maxsize=None)
def default_splits(batch: int, heads: int, kv_heads: int, nodes: int, device: torch.device) -> int:
    """Prefix runs for ``batch`` trees of ``nodes`` nodes: enough to give every SM about one
    program, at most 8 (each run costs its share of the merge). The attention backend passes
    the batch bucket a step is captured at, so that a graph and an eager step of one batch
    split alike (the runs' merge rounds differently from one run). Cached: the backend asks
    once per layer of every eager step, with the same few answers."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = batch * kv_heads * triton.cdiv(nodes * heads // kv_heads, BLOCK_M)
    return max(1, min(8, sms // max(programs, 1)))


def paged_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                         mask: torch.Tensor, page_size: int, out: torch.Tensor | None = None,
                         splits: int | None = None, q_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of B sequences' trees of N nodes each over their paged prefixes.

    q [B*N, H, D] and k, v [B*N, KVH, D]: the step's tokens, sequence after sequence (root
    first); k_cache, v_cache [slots, KVH, D]: one layer of the paged cache; block_tables [B, W]
    int32; kv_lens [B] int32: cached positions before each root; mask [N, N] int8 (1: node i
    may attend to node j); ``splits``: runs over each prefix (split-K; None: ``default_splits``
    for this grid). Returns [B*N, H, D] in q's dtype. Capturable in a CUDA graph: no host
    reads, lengths and tables are read on the device.

    Ragged trees (adaptive trees: every sequence its own): ``q_starts`` [B + 1] int32, the
    first row of each sequence's tree (the last entry: the row count), and ``mask`` [B, N, N]
    int8, each sequence's mask in its top-left corner (N: the largest tree's nodes)."""
    t, h, d = q.shape
    kvh = k.shape[1]
    nodes = mask.shape[-1]
    ragged = q_starts is not None
    if ragged != (mask.dim() == 3):
        raise ValueError("paged_tree_attention: ragged trees need q_starts and a mask per sequence, together")
    b = mask.shape[0] if ragged else t // nodes
    rep = h // kvh
    if (not ragged and t != b * nodes) or h != kvh * rep or d & (d - 1) or d < 16:
        raise ValueError(f"paged_tree_attention: {t} rows are not whole {nodes}-node trees, or {h} heads over "
                         f"{kvh} KV heads, or head_dim {d} (a power of two >= 16 is needed)")
    if k_cache.stride() != v_cache.stride() or any(x.stride(2) != 1 for x in (q, k, v, k_cache)):
        raise ValueError("paged_tree_attention: head_dim must be contiguous, and both caches laid out alike")
    if out is None:
        out = torch.empty_like(q)
    block_m, block_n = BLOCK_M, 64
    grid = (b * kvh, triton.cdiv(nodes * rep, block_m))
    if splits is None:
        splits = default_splits(b, h, kvh, nodes, q.device)
    total_rows = t * h
    if splits > 1:
        part_m = torch.empty((splits, total_rows), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((splits, total_rows, d), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # (not read: the kernel writes ``out`` itself)
    _tree_attention_kernel[grid + (splits,)](
        q, k, v, k_cache, v_cache, out, block_tables, kv_lens, mask,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), 1.0 / math.sqrt(d), part_m, part_l, part_acc, total_rows,
        q_starts if ragged else kv_lens, NODES=nodes, REP=rep, KV_HEADS=kvh, HEAD_DIM=d, PAGE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, RAGGED=ragged, num_warps=4, num_stages=2)
    if splits > 1:
        block_r = 16
        _merge_splits_kernel[(triton.cdiv(total_rows, block_r),)](
            part_m, part_l, part_acc, out, total_rows, out.stride(0), out.stride(1), HEADS=h, HEAD_DIM=d,
            SPLITS=splits, BLOCK_R=block_r, num_warps=4)
    return out
