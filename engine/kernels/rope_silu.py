"""Triton programs for two of the model's elementwise functions (engine/models/ops.py), with
the same signatures: ``qkv_rope`` and ``silu_mul``. Imported only where Triton is (CUDA).

Inductor's kernels for them, compiled with dynamic shapes, cost 3x as much at a verify step's
64 rows as at a plain step's one (profile_step --kernels, H100, bf16, Llama-8B shape: SiLU·mul
4.5 against 1.5 µs a call, RoPE 4.2 against 1.3; 64 calls a step, +190 µs). Here the grid
follows the rows and each program does a fixed slice, so the cost follows the bytes: at 64
rows SiLU·mul 2.1 µs, RoPE 1.6 (1 row: 1.4 and 1.3; CUDA graphs of 40 calls). A verify step's
forward at the 8B shape spends 124 µs on them where Inductor's spent 276; the bundled model's
batch-64 verify forward went 4.32 → 3.34 ms (4,096 rows).

Both compute in float32 and round once, as Inductor's kernels do (the eager functions round
each bf16 product: the last bit may differ between them, as it does between eager and
compiled).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu(x):
    """x · sigmoid(x) on a float32 block (also the heads' ResBlock epilogue, kernels/proposal.py)."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    """Program (row, block of columns): out = SiLU(gate) · up, gate and up the halves of x."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    out = silu(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (columns contiguous) → SiLU(gate_up[:, :I]) · gate_up[:, I:], [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        # (H100, bf16, I = 14,336: 1.37 µs at 1 row with 512 / 4 warps, 2.14 at 64 with
        # 1024 / 8; each the best of seven block and warp counts tried.)
        block, warps = (512, 4) if t < 16 else (1024, 8)
        block = min(block, triton.next_power_of_2(inter))
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block, num_warps=warps)
    return out


@triton.jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_qkv, stride_cos, stride_out,
                 HALF: tl.constexpr, HEADS_PER: tl.constexpr):
    """Program (row, block of heads): HEADS_PER of the row's q and k heads rotated (HF's
    rotate_half: the first half pairs with the second), into out [T, heads, 2·HALF]."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HEADS_PER + tl.arange(0, HEADS_PER)[:, None]
    d = tl.arange(0, HALF)[None, :]
    ok = h < heads
    src = qkv_ptr + row * stride_qkv + h * (2 * HALF) + d
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    # cos and sin repeat over the two halves (cat(freqs, freqs)): the first half's suffices.
    cos = tl.load(cos_ptr + row * stride_cos + d).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_cos + d).to(tl.float32)
    dst = out_ptr + row * stride_out + h * (2 * HALF) + d
    ty = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(ty), mask=ok)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(ty), mask=ok)


def rope_applies(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops.qkv_rope: q [T, H, D] and k [T, KVH, D] rotated (views of one new tensor), v a view
    of ``qkv``. cos, sin: [T, 1, D] (or [T, D]), the two halves of each row equal."""
    t = qkv.shape[0]
    heads = num_heads + num_kv_heads
    if qkv.stride(1) != 1 or not rope_applies(head_dim):
        raise ValueError("qkv_rope: needs columns contiguous and a power-of-two head_dim")
    cos2, sin2 = cos.reshape(t, head_dim), sin.reshape(t, head_dim)
    if cos2.stride(1) != 1 or sin2.stride() != cos2.stride():
        cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    qk = torch.empty((t, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t:
        per = min(8, triton.next_power_of_2(heads))
        _rope_kernel[(t, triton.cdiv(heads, per))](qkv, cos2, sin2, qk, heads, qkv.stride(0), cos2.stride(0),
                                                   qk.stride(0), HALF=head_dim // 2, HEADS_PER=per,
                                                   num_warps=4 if per * head_dim >= 1024 else 2)
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    return q, k, qkv[:, heads * head_dim:].view(t, num_kv_heads, head_dim)
