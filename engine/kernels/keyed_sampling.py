"""engine/sample/sampler.py's keyed draw on CUDA as Triton launches (imported only for CUDA tensors;
on CUDA Triton is there: the attention backend and the cache write need it already).

Why: a draw at a tree's last accepted node was ~45 kernels in a captured tail — ~35 elementwise
ones for ``keyed_uniform``'s integer hash on a handful of values, then a cumsum, a multiply,
a clamp and a searchsorted over the row — most of a T=0.7 decision's 0.44 ms at batch 1 on an
H100 (profile_step), where a greedy decision took 0.06.

``keyed_uniform``: the same hash in one launch, bit for bit (integer arithmetic, exact in int64).

``sample_rows``: one program per row: the masses of the row's blocks of 2,048 tokens, then
the first token whose cumulative mass reaches u times the total, scanning only the block
where it lies. The sums are float64 (torch's path sums in float32), so the
token is the exact inverse CDF of the row's float32 probabilities up to ~1e-16, where two
float32 cumsums in different orders disagree near 1 in 10^5 of the mass — on a flat 32k-token
row, often enough to move a draw to the neighbouring token. Every CUDA draw goes through this
program — the device tails' and the host rules' (engine/sample/acceptance.py) alike — so a
request gets the same tokens whichever path decides its step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """engine.sample.sampler._mix32 on int64 values in [0, 2**32): both multipliers are below 2**30,
    so every product is exact in int64."""
    m = tl.full([], 0xFFFFFFFF, tl.int64)
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & m
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & m
    return x ^ (x >> 15)


@triton.jit
def keyed_uniform_kernel(key_ptr, pos_ptr, draw_ptr, out_ptr, cols, size, key_s0, key_s1, pos_s0, pos_s1,
                         draw_s0, draw_s1, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < size
    r, c = i // cols, i % cols
    m = tl.full([], 0xFFFFFFFF, tl.int64)
    key = tl.load(key_ptr + r * key_s0 + c * key_s1, mask=live, other=0)
    pos = tl.load(pos_ptr + r * pos_s0 + c * pos_s1, mask=live, other=0)
    draw = tl.load(draw_ptr + r * draw_s0 + c * draw_s1, mask=live, other=0)
    h = _mix32(key & m)
    h = _mix32(h ^ (pos & m))
    h = _mix32(h ^ ((draw * 0x9E37 + 0x79B9) & m))
    tl.store(out_ptr + i, (h.to(tl.float64) + 0.5) / 4294967296.0, mask=live)


def keyed_uniform(key, position, draw) -> torch.Tensor:
    """engine.sample.sampler.keyed_uniform for a broadcast of at most 2 dimensions with a CUDA
    tensor among the arguments (ints are broadcast as 0-stride views, never copied: a host to
    device copy cannot be captured)."""
    dev = next(x.device for x in (key, position, draw) if isinstance(x, torch.Tensor))
    args = [x if isinstance(x, torch.Tensor) else torch.full((), x, dtype=torch.long, device=dev)
            for x in (key, position, draw)]
    shape = torch.broadcast_shapes(*(a.shape for a in args))
    two = (1,) * (2 - len(shape)) + tuple(shape)
    views = [a.long().expand(shape).reshape(two) if a.dim() else a.long().expand(two) for a in args]
    out = torch.empty(two, dtype=torch.float64, device=dev)
    size = out.numel()
    if size:
        strides = [s for v in views for s in v.stride()]
        keyed_uniform_kernel[(triton.cdiv(size, 256),)](*views, out, two[1], size, *strides, BLOCK=256, num_warps=4)
    return out.view(shape)


@triton.jit
def sample_rows_kernel(probs_ptr, u_ptr, out_ptr, vocab, stride, BLOCK_V: tl.constexpr, NUM_BLOCKS: tl.constexpr):
    i = tl.program_id(0)
    row = probs_ptr + i * stride
    offs = tl.arange(0, BLOCK_V)
    # One pass for the blocks' masses, kept in registers; then the scan runs over the blocks'
    # masses and inside the one block where the CDF reaches the target (a full-row cumsum was
    # 25 us of a 49k row at batch 1).
    blocks = tl.arange(0, NUM_BLOCKS)
    mass = tl.zeros([NUM_BLOCKS], tl.float64)
    for j in range(0, tl.cdiv(vocab, BLOCK_V)):
        p = tl.load(row + j * BLOCK_V + offs, mask=j * BLOCK_V + offs < vocab, other=0.0).to(tl.float64)
        mass = tl.where(blocks == j, tl.sum(p, axis=0), mass)
    upto = tl.cumsum(mass, axis=0)
    target = tl.load(u_ptr + i).to(tl.float64) * tl.sum(mass, axis=0)
    # The first block whose end reaches the target (none: the row's last token, as
    # searchsorted's clamp gives), and the mass before it.
    j = tl.min(tl.where(upto >= target, blocks, NUM_BLOCKS), axis=0)
    before = tl.sum(tl.where(blocks < j, mass, 0.0), axis=0)
    live = (j * BLOCK_V + offs < vocab) & (j < NUM_BLOCKS)
    p = tl.load(row + j * BLOCK_V + offs, mask=live, other=0.0).to(tl.float64)
    cdf = before + tl.cumsum(p, axis=0)
    # Never a zero-mass token: the first whose mass lifts the CDF to the target.
    hit = live & (cdf >= target) & (p > 0)
    first = tl.min(tl.where(hit, j * BLOCK_V + offs, vocab), axis=0).to(tl.int64)
    tl.store(out_ptr + i, tl.minimum(first, vocab - 1))


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """engine.sample.sampler.sample_rows for CUDA rows [R, V]."""
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    r, v = probs.shape
    out = torch.empty(r, dtype=torch.long, device=probs.device)
    if r:
        block = 2048
        sample_rows_kernel[(r,)](probs, u.double().expand(r).contiguous(), out, v, probs.stride(0), BLOCK_V=block,
                                 NUM_BLOCKS=max(2, triton.next_power_of_2(triton.cdiv(v, block))), num_warps=8)
    return out
