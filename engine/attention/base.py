"""The attention interface every backend implements.

One step's tokens are flat ([T, heads, head_dim]), laid out sequence after sequence. Every
sequence attends to (a) its prefix already in the paged cache — all of it visible — and (b) its
own new tokens, under a local mask: causal for prefill chunks, the Medusa ancestor mask for a
tree (root = the pending token, then one node per candidate). Every token's K/V is written to
its slot: prefill and pending tokens to their sequence's blocks, tree nodes to the cache's
scratch region (the runner commits the accepted ones afterwards).

A backend builds its metadata in ``prepare``. Steps of one uniform shape — every sequence
runs its pending token alone, or its pending token plus the same tree — go through
``uniform_metadata``, and ``graph_inputs`` (CUDA graphs) calls that same builder on static
tensors that are refreshed in place before each replay: a graph step and an eager step of
the same shape run the same attention. Steps of prefill chunks and decode tokens (no tree)
are described by per-sequence token offsets, lengths and tables alone; ``mixed_inputs`` holds
those in static tensors for a graph of any such mix, padded to a token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from engine.attention.kv_cache import PagedKVCache


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
    # [T] slot each token's K/V is written to.
    slot_mapping: torch.Tensor
    # Adaptive trees (sequences with trees of their own): the full tree's nodes, what every
    # sequence's mask is padded to — as in a ragged step's graph, so that both split alike.
    ragged_nodes: int = 0


@dataclass
class GraphAttnInputs:
    """A fixed-shape step's attention metadata (see engine/worker/cuda_graphs.py): the lengths and
    block tables it reads are device tensors, refreshed in place before each replay."""
    meta: object
    # [batch] int32: cached positions each sequence attends to before its own query tokens
    # (a decode token's or a tree root's prefix: its own K/V is read as one of the step's
    # tokens); a mixed step's: its chunk included.
    kv_lens: torch.Tensor
    block_tables: torch.Tensor  # [batch, width] int32
    # Mixed steps only ([batch + 1] int32 each): where each sequence's tokens start in the
    # step (the last entry: the step's token count), and its first query tile
    # (engine/kernels/varlen_attention.py ``tile_starts``).
    q_starts: Optional[torch.Tensor] = None
    first_tiles: Optional[torch.Tensor] = None
    # Ragged steps only (adaptive trees): [batch, nodes, nodes] each sequence's ancestor mask in
    # its top-left corner (``q_starts`` as above).
    masks: Optional[torch.Tensor] = None


class AttentionBackend(Protocol):
    kv_cache: PagedKVCache

    def prepare(self, inputs: StepAttnInputs) -> object:
        """Build the backend's per-step metadata (masks, gather indices) once, for all layers."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: object) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] → [T, H, D]. Writes k/v of every token to its slot."""

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, fresh: bool = False) -> GraphAttnInputs:
        """Metadata for ``batch`` sequences of ``nodes`` query tokens each (1: plain decode,
        else a tree rooted at the pending token), block tables ``width`` pages wide. ``fresh``:
        nothing is cached yet — each sequence's ``nodes`` tokens (a prompt's first chunk, padded
        at its end) attend causally among themselves, and lengths and tables are not read."""

    def mixed_inputs(self, batch: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        """Metadata for a step of prefill chunks and decode tokens (no tree) over up to ``batch``
        sequences, its tokens flat in ``write_slots``' order: sequence b runs the last
        ``q_starts[b+1] - q_starts[b]`` of its ``kv_lens[b]`` positions, causally over its paged
        cache. Sequences with no tokens are padding; so are tokens past ``q_starts[batch]``."""

    def ragged_inputs(self, batch: int, nodes: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        """Metadata for a step of adaptive trees over up to ``batch`` sequences, its tokens flat in
        ``write_slots``' order: sequence b runs tokens ``q_starts[b]`` to ``q_starts[b+1]`` — its
        pending token at position ``kv_lens[b]``, then its tree's nodes — attending to its
        ``kv_lens[b]`` cached positions and, among its own tokens, as ``masks[b]`` says (at most
        ``nodes`` tokens). Sequences with no tokens are padding; so are tokens past
        ``q_starts[batch]``."""


def uniform_shape(seqs: list[SeqAttn]) -> Optional[tuple[int, Optional[torch.Tensor]]]:
    """(nodes, tree mask) when every sequence runs the same query shape over the cache — one
    pending token (nodes 1, no mask), or a pending token plus the same tree — else None."""
    if not seqs:
        return None
    first = seqs[0]
    if first.tree_mask is None:
        return (1, None) if all(s.q_len == 1 and s.tree_mask is None for s in seqs) else None
    if all(s.tree_mask is first.tree_mask for s in seqs):
        return first.q_len, first.tree_mask
    return None


def block_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[len(tables), longest] int32 block tables, zero-padded."""
    width = max(1, max(len(t) for t in tables))
    out = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)
