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

What it leaves out, on purpose: split-K over a long prefix (one program walks it all; at batch
1 a 4k-token prefix is 64 sequential tiles on 9 programs), causal prefill chunks and plain
decode tokens (xformers' kernels keep those).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.attention.online_softmax import online_softmax_step, paged_kv_tile


@triton.jit
def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, kv_lens_ptr, mask_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch, stride_ot, stride_oh,
        stride_tb, scale,
        NODES: tl.constexpr, REP: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seq_head = tl.program_id(0)
    b = seq_head // KV_HEADS
    g = seq_head % KV_HEADS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NODES * REP
    node = tl.where(row_ok, rows // REP, 0)
    head = g * REP + rows % REP
    dims = tl.arange(0, HEAD_DIM)
    first = b * NODES  # the sequence's first flat row (its root)

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
    for start in range(0, kv_len, BLOCK_N):
        pos = start + cols
        ok = pos < kv_len
        kt, vt = paged_kv_tile(kc_ptr, vc_ptr, tables_ptr + b * stride_tb, pos, ok, g, stride_ct, stride_ch, dims,
                               PAGE)
        s = tl.where(ok[None, :], tl.dot(q, kt) * qk_scale, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)

    # (b) The tree: the step's own K/V, each node seeing its ancestors and itself (the root
    # sees itself, so no row is ever all masked).
    for start in range(0, NODES, BLOCK_N):
        j = start + cols
        ok = j < NODES
        kt = tl.load(k_ptr + (first + j)[None, :] * stride_kt + g * stride_kh + dims[:, None], mask=ok[None, :],
                     other=0.0)
        visible = tl.load(mask_ptr + node[:, None] * NODES + j[None, :], mask=row_ok[:, None] & ok[None, :], other=0)
        s = tl.where(visible != 0, tl.dot(q, kt) * qk_scale, float("-inf"))
        vt = tl.load(v_ptr + (first + j)[:, None] * stride_vt + g * stride_vh + dims[None, :], mask=ok[:, None],
                     other=0.0)
        m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (first + node)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                         mask: torch.Tensor, page_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of B sequences' trees of N nodes each over their paged prefixes.

    q [B*N, H, D] and k, v [B*N, KVH, D]: the step's tokens, sequence after sequence (root
    first); k_cache, v_cache [slots, KVH, D]: one layer of the paged cache; block_tables [B, W]
    int32; kv_lens [B] int32: cached positions before each root; mask [N, N] int8 (1: node i
    may attend to node j). Returns [B*N, H, D] in q's dtype. Capturable in a CUDA graph: no
    host reads, lengths and tables are read on the device."""
    t, h, d = q.shape
    kvh = k.shape[1]
    nodes = mask.shape[0]
    b = t // nodes
    rep = h // kvh
    if t != b * nodes or h != kvh * rep or d & (d - 1) or d < 16:
        raise ValueError(f"paged_tree_attention: {t} rows are not whole {nodes}-node trees, or {h} heads over "
                         f"{kvh} KV heads, or head_dim {d} (a power of two >= 16 is needed)")
    if k_cache.stride() != v_cache.stride() or any(x.stride(2) != 1 for x in (q, k, v, k_cache)):
        raise ValueError("paged_tree_attention: head_dim must be contiguous, and both caches laid out alike")
    if out is None:
        out = torch.empty_like(q)
    block_m, block_n = 64, 64
    grid = (b * kvh, triton.cdiv(nodes * rep, block_m))
    _tree_attention_kernel[grid](
        q, k, v, k_cache, v_cache, out, block_tables, kv_lens, mask,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), 1.0 / math.sqrt(d),
        NODES=nodes, REP=rep, KV_HEADS=kvh, HEAD_DIM=d, PAGE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2)
    return out
