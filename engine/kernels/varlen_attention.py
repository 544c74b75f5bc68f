"""One Triton kernel for a step of prefill chunks and decode tokens over the paged cache.

Each sequence ``b`` of the step runs ``q_len`` query tokens, the last ``q_len`` of the
``kv_len`` positions it has in the cache (its K/V are written first, as every backend does):
a prompt's first chunk (nothing before it), a later chunk after a cached prefix, or a decode
token (``q_len`` 1). Token ``i`` of the chunk sits at position ``kv_len - q_len + i`` and sees
every position up to and including its own — causal, read through the block table. This is
the attention a mixed step needs to run inside a CUDA graph (engine/worker/cuda_graphs.py
``MixedStep``): everything it reads — where each sequence's tokens start, its length, its
table — is a device tensor, refreshed in place before a replay.

xformers 0.0.35 has no paged kernel for such a step (without FA3: its split-K takes equal query
blocks of <= 16), so the eager path gathered each sequence's K/V into a padded buffer for its
flash kernel, and that step could not be captured: an eager mixed step cost ~40 ms on an H100
with the bundled model, host-bound, and ±20% from run to run (docs/performance.md).

Grid: (query tiles, KV heads). A tile is ``TILE_TOKENS`` tokens of one sequence with the
query heads of one KV head (rows token-major, the heads padded to a power of two): as in
tree_attention.py, grouped-query attention reads each K/V tile once for the query heads that
share it. Tiles are numbered sequence after sequence — ``first_tiles[b]`` is sequence b's
first, counted on the host with the rest of the step's lengths — and a program finds its
sequence by a binary search over them. The grid has a fixed size, every tile a step of ``T``
tokens over ``S`` sequences can need (``max_tiles``), so one captured graph fits any mix of
chunks; programs past the step's last tile do nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.online_softmax import online_softmax_step, paged_kv_tile
from engine.kernels.varlen_tiles import TILE_TOKENS, max_tiles

BLOCK_N = 64  # cached positions per inner-loop tile
# Binary-search steps over the sequences' first tiles: enough for 2**16 sequences.
_SEARCH_STEPS = 16


@triton.jit
def _varlen_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, out_ptr, tables_ptr, q_starts_ptr, kv_lens_ptr, tile_starts_ptr, num_seqs,
        stride_qt, stride_qh, stride_ct, stride_ch, stride_ot, stride_oh, stride_tb, scale,
        REP: tl.constexpr, REP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        TILE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    # The sequence this tile belongs to: the last b with tile_starts[b] <= tile.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go_up = tl.load(tile_starts_ptr + mid) <= tile
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid - 1)
    # Past the step's last tile (lo == num_seqs): nothing to do.
    live = lo < num_seqs
    b = tl.minimum(lo, num_seqs - 1)
    q0 = tl.load(q_starts_ptr + b)
    q_len = tl.where(live, tl.load(q_starts_ptr + b + 1) - q0, 0)
    kv_len = tl.load(kv_lens_ptr + b)
    first_tok = (tile - tl.load(tile_starts_ptr + b)) * TILE_TOKENS
    rows = tl.arange(0, TILE_TOKENS * REP_P2)
    tok = first_tok + rows // REP_P2
    row_ok = (tok < q_len) & (rows % REP_P2 < REP)
    tok = tl.where(row_ok, tok, 0)
    head = g * REP + rows % REP_P2
    dims = tl.arange(0, HEAD_DIM)
    q_pos = kv_len - q_len + tok  # each row's own position: it sees positions <= q_pos

    q = tl.load(q_ptr + (q0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634  # scores in base 2: exp2 is one instruction
    m_i = tl.full([TILE_TOKENS * REP_P2], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_TOKENS * REP_P2], dtype=tl.float32)
    acc = tl.zeros([TILE_TOKENS * REP_P2, HEAD_DIM], dtype=tl.float32)
    # The tile's last token sees the most: the key loop stops there (no iterations when idle).
    last_tok = tl.minimum(first_tok + TILE_TOKENS, q_len) - 1
    end = tl.where(q_len > 0, kv_len - q_len + last_tok + 1, 0)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, end, BLOCK_N):
        pos = start + cols
        ok = pos < end
        kt, vt = paged_kv_tile(kc_ptr, vc_ptr, tables_ptr + b * stride_tb, pos, ok, g, stride_ct, stride_ch, dims,
                               PAGE)
        s = tl.dot(q, kt) * qk_scale
        # Every row sees position 0 (q_pos >= 0), so no row is all masked.
        s = tl.where(ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, q_starts: torch.Tensor, kv_lens: torch.Tensor,
                           first_tiles: torch.Tensor, page_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of S sequences' query chunks over their paged K/V.

    q [T, H, D]: the step's tokens, sequence after sequence (rows past ``q_starts[S]`` are
    padding: their output is left as ``out`` has it); k_cache, v_cache [slots, KVH, D]: one
    layer of the paged cache, the step's own K/V already written; block_tables [S, W] int32;
    q_starts [S + 1] int32: sequence b's tokens are rows q_starts[b] .. q_starts[b+1]; kv_lens
    [S] int32: positions cached for sequence b, its new tokens included; first_tiles [S + 1]
    int32 (``tile_starts``). Sequences with no tokens are padding. Returns ``out`` ([T, H, D],
    zeros when not given). Capturable in a CUDA graph: no host reads."""
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    rep = h // kvh
    s = kv_lens.shape[0]
    if h != kvh * rep or d & (d - 1) or d < 16:
        raise ValueError(f"paged_varlen_attention: {h} heads over {kvh} KV heads, or head_dim {d} "
                         "(a power of two >= 16 is needed)")
    if q_starts.shape[0] != s + 1 or first_tiles.shape[0] != s + 1 or block_tables.shape[0] != s:
        raise ValueError(f"paged_varlen_attention: {s} sequences' lengths, but q_starts {tuple(q_starts.shape)}, "
                         f"tile starts {tuple(first_tiles.shape)}, block tables {tuple(block_tables.shape)}")
    if k_cache.stride() != v_cache.stride() or q.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("paged_varlen_attention: head_dim must be contiguous, and both caches laid out alike")
    if out is None:
        out = torch.zeros_like(q)
    _varlen_attention_kernel[(max_tiles(t, s), kvh)](
        q, k_cache, v_cache, out, block_tables, q_starts, kv_lens, first_tiles, s,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), 1.0 / math.sqrt(d),
        REP=rep, REP_P2=triton.next_power_of_2(rep), HEAD_DIM=d, PAGE=page_size, TILE_TOKENS=TILE_TOKENS,
        BLOCK_N=BLOCK_N, SEARCH_STEPS=_SEARCH_STEPS, num_warps=4, num_stages=2)
    return out
