"""The pieces the engine's Triton attention kernels share (tree_attention.py, varlen_attention.py):
reading a tile of K/V through a block table, and one step of FlashAttention's online softmax.
Triton inlines them into each kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_kv_tile(kc_ptr, vc_ptr, table_ptr, pos, ok, g, stride_ct, stride_ch, dims, PAGE: tl.constexpr):
    """K transposed [D, N] and V [N, D] of KV head ``g`` at positions ``pos`` [N] of one sequence
    (``table_ptr``: its block table's row; ``ok``: which positions to read, the rest zeros)."""
    page = tl.load(table_ptr + pos // PAGE, mask=ok, other=0)
    slot = page.to(tl.int64) * PAGE + pos % PAGE
    kt = tl.load(kc_ptr + slot[None, :] * stride_ct + g * stride_ch + dims[:, None], mask=ok[None, :], other=0.0)
    vt = tl.load(vc_ptr + slot[:, None] * stride_ct + g * stride_ch + dims[None, :], mask=ok[:, None], other=0.0)
    return kt, vt


@triton.jit
def online_softmax_step(s, vt, m_i, l_i, acc):
    """Fold one tile of base-2 scores ``s`` [M, N] (masked ones -inf) and its values ``vt``
    [N, D] into the running max ``m_i``, sum ``l_i`` and output ``acc``; returns them updated."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc
