"""The Triton programs behind engine/spec/proposer.py's CUDA proposal (imported only where Triton is).

A proposal is small GEMMs (a few to a few hundred rows against [H, H] weights) with elementwise
work around each. In torch every ResBlock ``x + silu(x W + b)`` was three launches and a
sequential head's input ``h + [e(t_0); …; e(t_d-1)] P`` five (the path's token ids, the
embedding rows, the GEMM, the broadcast add, a copy); the bundled heads' proposal at batch 1 was
65 kernels, 0.17 ms on an H100, most of it launches. Here each of the two is one program:

- ``resblock_kernel``: out = x + silu(x W + b), the product accumulated in float32 and the
  epilogue applied before the one rounding to the model's dtype; a grid axis over heads (x may
  be one row set broadcast to every head: stride 0);
- ``path_input_kernel``: out[s·P + p] = h[s] + Σ_j e(tokens[s, anc[p, j]]) P_j, the embedding
  rows read straight from the table inside the K loop (no gathered copy).

The products round once instead of twice (torch rounds ``x W + b`` to bf16 before the SiLU), so
a proposal may differ from the torch one where two of a head's logits nearly tie; which
candidates are proposed changes speed only, the model verifies every one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.rope_silu import silu


@triton.jit
def resblock_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, H,
                    stride_xg, stride_xm, stride_wg, stride_bg, stride_og, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Program (m, n, g): rows m·BLOCK_M…, columns n·BLOCK_N… of head g. W is [G, H, H] row-major
    (x @ W[g]), b [G, H]; x and out [G, M, H] with unit column stride."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + g * stride_xg + rows[:, None] * stride_xm
    w_head = w_ptr + g * stride_wg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_rows + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < H), other=0.0)
        w = tl.load(w_head + k[:, None] * H + cols[None, :], mask=(k[:, None] < H) & (cols[None, :] < H), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + g * stride_bg + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    keep = (rows[:, None] < M) & (cols[None, :] < H)
    x = tl.load(x_rows + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    out = x + silu(acc)
    tl.store(out_ptr + g * stride_og + rows[:, None] * stride_om + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def path_input_kernel(tokens_ptr, anc_ptr, table_ptr, pw_ptr, hidden_ptr, out_ptr, M, H, P, D,
                      stride_tokens, stride_table, stride_hidden,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Program (m, n): out [M = S·P, H] rows m·BLOCK_M…, columns n·BLOCK_N…. Row s·P + p reads
    sequence s's tokens (``tokens`` [S, nodes], node order) at the D nodes ``anc[p]`` (root
    first): the concatenated path embedding's columns j·H… are the table row of token
    anc[p, j]. P_d is ``pw`` [D·H, H] row-major."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    live = rows < M
    seq, parent = rows // P, rows % P
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(D):  # context token j: one table row per output row, then a plain K loop over H
        node = tl.load(anc_ptr + parent * D + j, mask=live, other=0)
        token = tl.load(tokens_ptr + seq * stride_tokens + node, mask=live, other=0)
        a_rows = table_ptr + token[:, None] * stride_table
        w_rows = pw_ptr + j * H * H
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            a = tl.load(a_rows + k[None, :], mask=live[:, None] & (k[None, :] < H), other=0.0)
            w = tl.load(w_rows + k[:, None] * H + cols[None, :], mask=(k[:, None] < H) & (cols[None, :] < H), other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    keep = live[:, None] & (cols[None, :] < H)
    h = tl.load(hidden_ptr + seq[:, None] * stride_hidden + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], (h + acc).to(out_ptr.dtype.element_ty), mask=keep)


def _blocks(m: int, h: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for m rows of width h. A batch-1 proposal has 1-10 rows a
    depth, batch 64 a few hundred. Narrow column blocks spread the weight read over more SMs
    while rows are few and the model small (H100, bf16, H = 576, one ResBlock in a CUDA graph:
    3.1 us at 1 row and 3.5 at 160 with these, 3.7-3.9 with 64-column blocks; at 640 rows
    64 x 64 tiles, 4.7 us). A wide model has SMs enough for 64-column blocks, whose 128-byte
    rows of W read better (H = 4096, four heads at 1-16 rows: 46-47 us, 58 with 16 columns)."""
    bn = 64 if h >= 2048 else 16
    if m <= 16:
        return 16, bn, 128
    return (64, bn, 128) if m <= 160 else (64, 64, 64)


def _precision(t) -> str:
    # float32 weights (tests) keep float32 products; TF32 would round them to 10 bits.
    return "ieee" if t.dtype.itemsize == 4 else "tf32"


def resblock(x, w, b):
    """x [G, M, H] (any row and head strides, unit column stride), w [G, H, H] contiguous, b
    [G, 1, H] → x + silu(x @ w + b) [G, M, H]."""
    import torch

    if x.stride(2) != 1:
        x = x.contiguous()
    g, m, h = x.shape
    out = torch.empty((g, m, h), dtype=x.dtype, device=x.device)
    if m:
        bm, bn, bk = _blocks(m, h)
        resblock_kernel[(triton.cdiv(m, bm), triton.cdiv(h, bn), g)](
            x, w, b, out, m, h, x.stride(0), x.stride(1), w.stride(0), b.stride(0), out.stride(0), out.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x), num_warps=4)
    return out


def path_input(tokens, anc, table, pw, hidden):
    """tokens [S, nodes] (int64, contiguous), anc [P, D] node ids, table [V, H] the token
    embedding, pw [D·H, H] contiguous, hidden [S, H] → [S·P, H]: h[s] + the path's embeddings
    through pw, row s·P + p."""
    import torch

    s, h = hidden.shape
    p, d = anc.shape
    m = s * p
    out = torch.empty((m, h), dtype=hidden.dtype, device=hidden.device)
    if m:
        bm, bn, bk = _blocks(m, h)
        path_input_kernel[(triton.cdiv(m, bm), triton.cdiv(h, bn))](
            tokens, anc, table, pw, hidden, out, m, h, p, d, tokens.stride(0), table.stride(0), hidden.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(hidden), num_warps=4)
    return out
