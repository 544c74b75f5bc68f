"""One Triton program per step token: its K and V rows into their cache slots, in one launch;
and a commit's copies of accepted tree nodes' rows, every layer in one launch (``copy_slots``).

``index_copy_`` takes one launch per tensor and wants a dense source, so a step paid two
launches per layer plus a copy of v out of the fused QKV projection. Here k and v are read
where they lie (views of the projection: rows strided, head_dim contiguous) and both written
at once (profile_step --kernels, H100, bf16, 30 layers: a 64-node verify at batch 1 162 → 42
µs of kernel time a step, a plain step 97 → 39). Slots may repeat (padded rows all write the
pad slot); any of their rows may win, as with ``index_copy_`` — nothing reads the pad slot's
contents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ct, stride_ch, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr,
                     DIM_P2: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, DIM_P2)[None, :]
    ok = (h < HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
    tl.store(kc_ptr + slot * stride_ct + h * stride_ch + d, k, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(vc_ptr + slot * stride_ct + h * stride_ch + d, v, mask=ok)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache[slots[i]] = k[i], v_cache[slots[i]] = v[i]; caches [slots, KVH, D] laid out alike,
    k and v [T, KVH, D] with head_dim contiguous."""
    t, heads, dim = k.shape
    if not t:
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError("write_kv: head_dim must be contiguous, and both caches laid out alike")
    _write_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), HEADS=heads, HEAD_DIM=dim,
                           HEADS_P2=triton.next_power_of_2(heads), DIM_P2=triton.next_power_of_2(dim),
                           num_warps=1 if heads * dim <= 512 else 4)


@triton.jit
def _copy_slots_kernel(k_ptr, v_ptr, src_ptr, dst_ptr, stride_layer, stride_slot, ROW: tl.constexpr,
                       ROW_P2: tl.constexpr):
    """Program (i, layer): slot src[i]'s K and V row to slot dst[i], in that layer."""
    i, layer = tl.program_id(0), tl.program_id(1).to(tl.int64)
    src = tl.load(src_ptr + i).to(tl.int64)
    dst = tl.load(dst_ptr + i).to(tl.int64)
    e = tl.arange(0, ROW_P2)
    ok = e < ROW
    base = layer * stride_layer
    tl.store(k_ptr + base + dst * stride_slot + e, tl.load(k_ptr + base + src * stride_slot + e, mask=ok), mask=ok)
    tl.store(v_ptr + base + dst * stride_slot + e, tl.load(v_ptr + base + src * stride_slot + e, mask=ok), mask=ok)


def copy_slots(k_all: torch.Tensor, v_all: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Every layer's K and V at slots ``src`` to slots ``dst``, one launch: k_all, v_all [layers,
    slots, KVH, D] contiguous, src and dst [n] with no slot in both (the commit copies from the
    scratch region into request blocks or the pad slot, which several rejected nodes may share:
    any of them wins, nothing reads it). The indexed copies ``k_all[:, dst] = k_all[:, src]``
    were a gather and a scatter per tensor: four launches, ~15 us of a verify step at batch 1
    (profile_step --kernels, H100)."""
    src, dst = src.reshape(-1).contiguous(), dst.reshape(-1).contiguous()
    n = src.numel()
    if not n:
        return
    if not (k_all.is_contiguous() and v_all.is_contiguous() and k_all.shape == v_all.shape):
        raise ValueError("copy_slots: K and V must be contiguous and of one shape")
    layers, _, heads, dim = k_all.shape
    _copy_slots_kernel[(n, layers)](k_all, v_all, src, dst, k_all.stride(0), k_all.stride(1), ROW=heads * dim,
                                    ROW_P2=triton.next_power_of_2(heads * dim), num_warps=1 if heads * dim <= 512 else 4)
