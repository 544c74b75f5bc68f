"""The paged K/V tensors and the ops that write and copy slots.

Layout per layer: [num_blocks * block_size, kv_heads, head_dim] — the flat view of
[num_blocks, block_size, kv_heads, head_dim] that xformers' paged masks index with block
tables (slot = block * block_size + offset).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        # One tensor per K and V for all layers (so committing accepted tree nodes is one
        # indexed copy, not one per layer); self.k[layer] / self.v[layer] are views of it.
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def commit(self, slots: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> None:
        """Write every layer at once: k_all/v_all are [layers, len(slots), kv_heads, head_dim]."""
        self.k_all[:, slots] = k_all
        self.v_all[:, slots] = v_all

    def slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot ids for token positions given a (padded) block table (same leading dims)."""
        blocks = torch.gather(block_table, -1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size
