"""The attention interface every backend implements.

One step's tokens are flat ([T, heads, head_dim]), laid out sequence after sequence. Every
sequence attends to (a) its prefix already in the paged cache — all of it visible — and (b) its
own new tokens, under a local mask: causal for prefill chunks, the Medusa ancestor mask for a
tree (root = the pending token, then one node per candidate). Tokens with a slot are written
into the cache; tree nodes (slot -1) are not: their K/V are kept for the step so the runner can
commit the accepted path afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from engine.kv_cache import PagedKVCache


@dataclass
class SeqAttn:
    q_len: int
    # Positions [0, ctx_len) of this sequence are in the paged cache.
    ctx_len: int
    block_table: list[int]
    # [q_len, q_len] bool (True = may attend) for a tree; None = causal.
    tree_mask: Optional[torch.Tensor] = None


@dataclass
class StepAttnInputs:
    seqs: list[SeqAttn]
    # [T] flat slot of each token, -1 for tree nodes (kept in step_kv instead).
    slot_mapping: torch.Tensor
    # Keep every layer's K/V of this step (needed when the step verifies trees).
    keep_kv: bool
    step_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class GraphAttnInputs:
    """A fixed-shape step's attention metadata (see engine/cuda_graphs.py): the lengths and
    block tables it reads are device tensors, refreshed in place before each replay."""
    meta: object
    # [batch] int32: cached tokens each sequence attends to (a plain decode token's own slot
    # included — it is written first; a tree's prefix stops before its root).
    kv_lens: torch.Tensor
    block_tables: torch.Tensor  # [batch, width] int32


class AttentionBackend(Protocol):
    kv_cache: PagedKVCache

    def prepare(self, inputs: StepAttnInputs) -> object:
        """Build the backend's per-step metadata (masks, gather indices) once, for all layers."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: object) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] → [T, H, D]. Writes k/v of slotted tokens into the cache."""

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, keep_kv: bool) -> GraphAttnInputs:
        """Metadata for ``batch`` sequences of ``nodes`` query tokens each (1: plain decode,
        else a tree rooted at the pending token), block tables ``width`` pages wide."""


def write_plan(slot_mapping: torch.Tensor, device: torch.device) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(rows to write or None for all, their slots) on ``device``: tree nodes (slot -1) are skipped."""
    written = slot_mapping >= 0
    if bool(written.all()):
        return None, slot_mapping.to(device)
    return torch.nonzero(written).flatten().to(device), slot_mapping[written].to(device)


def write_and_keep(kv_cache: PagedKVCache, inputs: StepAttnInputs, write_idx: Optional[torch.Tensor],
                   write_slots: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """The cache-side half of every backend's forward (shared so backends agree on it)."""
    if write_idx is None:
        kv_cache.write(layer, write_slots, k, v)
    elif write_idx.numel():
        kv_cache.write(layer, write_slots, k.index_select(0, write_idx), v.index_select(0, write_idx))
    if inputs.keep_kv:
        inputs.step_kv.append((k, v))
