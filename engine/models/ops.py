"""The model's elementwise work, as a few functions a model calls per layer.

Eager, each is several small kernels (RMSNorm alone is ~8); on a small model at small batch a
decode step is bound by how many kernels it runs, not by bytes. On CUDA the same functions are
compiled with ``torch.compile`` (Inductor fuses each into one or two Triton kernels, which CUDA
graphs then capture), except RoPE and SiLU·mul, which are hand-written Triton programs there
(engine/kernels/rope_silu.py: Inductor's cost 3x as much at 64 rows as at one). The math is
the same either way; the eager versions are what CPU runs and what the HF parity tests pin down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the residual stream is summed in the model dtype."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; HF layout (rotate_half over the two halves).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused QKV projection [T, (H + 2 KVH) * D] into q [T, H, D], k, v [T, KVH, D],
    q and k rotated. q and k are rotated as one [T, H + KVH, D] block and come back as views
    of it, v as a view of ``qkv`` (rows strided, head_dim contiguous: what the attention
    kernels and the cache write read). Compiled, that is one kernel per layer; rotating q and
    k apart and copying v out were three (profile_step --kernels, H100, bf16, a 64-node
    verify at batch 1: 139 → 64 µs of kernel time a step)."""
    t = qkv.shape[0]
    rotated = (num_heads + num_kv_heads) * head_dim
    qk = apply_rope(qkv[:, :rotated].reshape(t, num_heads + num_kv_heads, head_dim), cos, sin)
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    return q, k, qkv[:, rotated:].view(t, num_kv_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@dataclass(frozen=True)
class ModelOps:
    rms_norm: Callable
    add_rms_norm: Callable
    qkv_rope: Callable
    silu_mul: Callable


EAGER_OPS = ModelOps(rms_norm, add_rms_norm, qkv_rope, silu_mul)


@lru_cache(maxsize=1)
def compiled_ops() -> ModelOps:
    """The same functions through torch.compile (CUDA): dynamic shapes, so one compilation
    serves every token count; compiled lazily on first call and shared by every model of the
    process."""
    def comp(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    return ModelOps(comp(rms_norm), comp(add_rms_norm), comp(qkv_rope), comp(silu_mul))


def cuda_ops(head_dim: int) -> ModelOps:
    """What a model on CUDA runs: the norms compiled, RoPE and SiLU·mul as the Triton programs
    of engine/kernels/rope_silu.py (RoPE where head_dim is a power of two, which its program needs; else the
    compiled one)."""
    from engine.kernels import rope_silu

    base = compiled_ops()
    rope = rope_silu.qkv_rope if rope_silu.rope_applies(head_dim) else base.qkv_rope
    return ModelOps(base.rms_norm, base.add_rms_norm, rope, rope_silu.silu_mul)
