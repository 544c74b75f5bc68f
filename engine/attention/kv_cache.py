"""The paged K/V tensors and the ops that write and copy slots.

Layout per layer: [num_slots, kv_heads, head_dim] — the flat view of [blocks, block_size,
kv_heads, head_dim] that xformers' paged masks index with block tables (slot = block *
block_size + offset). Blocks [0, num_blocks) belong to requests (the driver's block manager
hands them out); after them come blocks no request owns:
- the pad block: padded sequences of a fixed-shape (CUDA graph) step write and read it, and
  rejected tree nodes are "committed" there so a commit has a fixed shape;
- the scratch region: a verify step writes its tree nodes' K/V here (one row per step token),
  and the runner then copies the accepted nodes' rows into their sequences' slots. Only
  accepted tokens ever live in request blocks.
"""

from __future__ import annotations

import torch

from engine.core.shapes import cdiv
from engine.kernels import triton_applies


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, scratch_tokens: int = 0) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pad_block = num_blocks
        self.pad_slot = num_blocks * block_size
        self.scratch_slot0 = (num_blocks + 1) * block_size
        self.scratch_tokens = scratch_tokens
        total_blocks = num_blocks + 1 + cdiv(scratch_tokens, block_size)
        # One tensor per K and V for all layers (so committing accepted tree nodes is one
        # indexed copy, not one per layer); self.k[layer] / self.v[layer] are views of it.
        shape = (num_layers, total_blocks * block_size, num_kv_heads, head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        # On CUDA one Triton launch for a layer's K and V, and one for a commit's every layer
        # (engine/kernels/kv_write.py).
        self._write_kv = self._copy_slots = None
        if triton_applies(self.k_all):
            from engine.kernels.kv_write import copy_slots, write_kv

            self._write_kv, self._copy_slots = write_kv, copy_slots

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Row i of k/v goes to slot slots[i] (a request's slot, the pad block or the scratch)."""
        if self._write_kv is not None:
            self._write_kv(self.k[layer], self.v[layer], slots, k, v)
            return
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K/V at slots ``src`` to slots ``dst`` (the commit of accepted tree
        nodes from the scratch region): on CUDA one launch for both, elsewhere one indexed copy
        per tensor."""
        if self._copy_slots is not None:
            self._copy_slots(self.k_all, self.v_all, src, dst)
            return
        # index_select / index_copy_, not ``t[:, dst] = t[:, src]``: torch's CPU advanced
        # indexing of a large tensor costs ~0.5-1 ms a call whatever the index's size.
        self.k_all.index_copy_(1, dst, self.k_all.index_select(1, src))
        self.v_all.index_copy_(1, dst, self.v_all.index_select(1, src))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V at ``slots`` (any shape S): [*S, kv_heads, head_dim] each.
        One index_select per tensor: torch's advanced indexing (``k[slots]``) of the cache took
        ~1 ms a call on a 2-core CPU for a hundred slots (index_select: 5 µs)."""
        flat = slots.reshape(-1)
        k, v = self.k[layer].index_select(0, flat), self.v[layer].index_select(0, flat)
        return k.view(*slots.shape, *k.shape[1:]), v.view(*slots.shape, *v.shape[1:])

    # A token's slot: its position's block in the table, times the block size, plus its offset
    # in that block — on the device (``slots``) and on the host (``host_slots``).
    def slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids for token positions given a (padded) block table (same leading dims)."""
        blocks = torch.gather(block_table, -1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    def host_slots(self, block_table: list[int], start: int, n: int) -> list[int]:
        """``slots`` of positions start … start + n - 1 of one sequence, as Python ints."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
