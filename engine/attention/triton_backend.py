"""CUDA attention over the paged cache: this project's Triton kernels, and xformers' flash
kernel for fresh prompts.

- Decode steps — every sequence's pending token alone, or its pending token plus a Medusa
  tree: one Triton kernel per layer (engine/kernels/tree_attention.py) streams the paged prefix
  (positions before the pending token, all visible) and then the step's own tokens under the
  ancestor mask through one online softmax. A plain decode token is a one-node tree. Its work
  follows each sequence's length, whatever the block table's width, so one CUDA graph per
  batch bucket serves every context length (xformers' paged split-K, used before, sized its
  work by the table's width: a graph per width bucket, captured on first use mid-run).
- Steps with prefill chunks (and any other mix without a tree): the varlen kernel
  (engine/kernels/varlen_attention.py), eagerly or in a mixed step's CUDA graph
  (``mixed_inputs``); tree rows of such a step go through the tree kernel.
- A graph of fresh prompts (nothing cached, each padded to one length): xformers' flash
  attention, causal within each prompt's block.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

import torch

from engine.attention.base import GraphAttnInputs, StepAttnInputs, block_tables, uniform_shape
from engine.attention.kv_cache import PagedKVCache
from engine.core.shapes import padded_batch
from engine.kernels.varlen_tiles import tile_starts

# A plain decode token as a tree: one node that sees itself.
_ONE_NODE = torch.ones(1, 1, dtype=torch.bool)


@dataclass
class TritonAttnMeta:
    slots: torch.Tensor  # [T] where each token's K/V is written
    causal_idx: Optional[torch.Tensor] = None
    varlen: Optional["VarlenInputs"] = None  # the causal rows' (prefill chunks, decode tokens)
    tree_idx: Optional[torch.Tensor] = None
    tree_mask: Optional[torch.Tensor] = None  # [N, N] int8, 1 = may attend
    tree_kv_lens: Optional[torch.Tensor] = None  # [B] int32: cached positions before each root
    tree_tables: Optional[torch.Tensor] = None  # [B, W] int32
    # Adaptive trees, each sequence its own: [B + 1] int32 first row of each (``tree_mask`` is
    # then [B, N, N], N the largest tree's nodes).
    tree_q_starts: Optional[torch.Tensor] = None
    # Every row of the step is causal (or every row is in a tree): no gather/scatter of rows.
    causal_all: bool = False
    tree_all: bool = False
    # A graph step of fresh prompts (nothing cached): ``fresh_batch`` blocks of ``fresh_len``
    # tokens, causal within each block (flash, no lengths or tables to read).
    fresh_batch: int = 0
    fresh_len: int = 0


@dataclass
class VarlenInputs:
    """engine/kernels/varlen_attention.py's per-sequence inputs, int32 on the device."""
    q_starts: torch.Tensor  # [S + 1]
    kv_lens: torch.Tensor  # [S]
    first_tiles: torch.Tensor  # [S + 1]
    tables: torch.Tensor  # [S, W]


class TritonAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device) -> None:
        from xformers.ops import fmha  # noqa: F401  (fail at construction, not mid-step)

        from engine.kernels import tree_attention, varlen_attention  # noqa: F401  (fail at construction without Triton)

        if kv_cache.block_size % 64:
            raise ValueError(f"block_size: the CUDA backend's paged kernels need a multiple of 64, got {kv_cache.block_size}")
        self.kv_cache = kv_cache
        self.device = device
        # Tree masks on the device by mask (trees live for the engine's lifetime): made once.
        self._tree_masks: dict[torch.Tensor, torch.Tensor] = {}

    def _tree_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if mask not in self._tree_masks:
            self._tree_masks[mask] = mask.to(device=self.device, dtype=torch.int8).contiguous()
        return self._tree_masks[mask]

    def uniform_metadata(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], kv_lens: list[int],
                         tables: torch.Tensor, slots: torch.Tensor) -> TritonAttnMeta:
        """Every sequence runs one pending token (``tree_mask`` None: a one-node tree) or its
        pending token plus the same ``nodes``-node tree; ``kv_lens``: the prefix cached before
        each pending token. One tree-kernel launch per layer."""
        mask = tree_mask if tree_mask is not None else _ONE_NODE
        return TritonAttnMeta(slots=slots, tree_mask=self._tree_mask(mask), tree_tables=tables,
                                tree_kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=self.device),
                                tree_all=True)

    def ragged_metadata(self, masks: list[torch.Tensor], kv_lens: list[int], tables: torch.Tensor,
                        slots: torch.Tensor, nodes: int = 0) -> TritonAttnMeta:
        """Every sequence runs its pending token plus a tree of its own (``masks``: each one's
        [n_i, n_i] bool ancestor mask): the masks stacked into [B, N, N] int8 (N the largest, or
        ``nodes`` — the full tree's, as a ragged step's graph has them), each sequence's first
        row in ``tree_q_starts``."""
        width = max([nodes] + [m.shape[0] for m in masks])
        stacked = torch.zeros(len(masks), width, width, dtype=torch.int8)
        starts = [0]
        for i, m in enumerate(masks):
            n = m.shape[0]
            stacked[i, :n, :n] = m
            starts.append(starts[-1] + n)
        host = torch.tensor(starts + kv_lens, dtype=torch.int32).to(self.device)
        return TritonAttnMeta(slots=slots, tree_mask=stacked.to(self.device), tree_tables=tables,
                              tree_kv_lens=host[len(starts):], tree_q_starts=host[:len(starts)], tree_all=True)

    def prepare(self, inputs: StepAttnInputs) -> TritonAttnMeta:
        dev = self.device
        slots = inputs.slot_mapping.to(dev)
        shape = uniform_shape(inputs.seqs)
        if shape is not None:
            nodes, mask = shape
            return self.uniform_metadata(len(inputs.seqs), nodes, mask, [s.ctx_len for s in inputs.seqs],
                                         block_tables([s.block_table for s in inputs.seqs], dev), slots)
        causal_rows: list[int] = []
        causal = []
        tree_rows: list[int] = []
        trees = []
        offset = 0
        for s in inputs.seqs:
            rows = range(offset, offset + s.q_len)
            if s.tree_mask is None:
                causal_rows += rows
                causal.append(s)
            else:
                tree_rows += rows
                trees.append(s)
            offset += s.q_len

        meta = TritonAttnMeta(slots=slots)
        if causal:
            kv_lens = [s.ctx_len + s.q_len for s in causal]
            q_lens = [s.q_len for s in causal]
            starts = torch.tensor([0] + list(accumulate(q_lens)), dtype=torch.int32)
            host = torch.stack([starts, torch.tensor(tile_starts(q_lens), dtype=torch.int32)]).to(dev)
            meta.varlen = VarlenInputs(q_starts=host[0], kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
                                       first_tiles=host[1], tables=block_tables([s.block_table for s in causal], dev))
            meta.causal_idx = torch.tensor(causal_rows, device=dev)
            meta.causal_all = len(causal_rows) == offset
        if trees:
            tables = block_tables([s.block_table for s in trees], dev)
            kv_lens = [s.ctx_len for s in trees]
            if all(s.tree_mask is trees[0].tree_mask for s in trees):
                tree = self.uniform_metadata(len(trees), trees[0].q_len, trees[0].tree_mask, kv_lens, tables, slots)
            else:  # adaptive trees: each sequence its own (the kernel's ragged mode)
                tree = self.ragged_metadata([s.tree_mask for s in trees], kv_lens, tables, slots, inputs.ragged_nodes)
                meta.tree_q_starts = tree.tree_q_starts
            meta.tree_mask, meta.tree_kv_lens, meta.tree_tables = tree.tree_mask, tree.tree_kv_lens, tree.tree_tables
            meta.tree_idx = torch.tensor(tree_rows, device=dev)
            meta.tree_all = len(tree_rows) == offset
        return meta

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, fresh: bool = False) -> GraphAttnInputs:
        """``uniform_metadata`` on static tensors for CUDA graph capture: block tables ``width``
        pages wide (all the pad block until refreshed) and the prefix lengths, both refreshed in
        place before each replay. ``fresh`` prompts need neither."""
        tables = torch.full((batch, width), pad_block, dtype=torch.int32, device=self.device)
        if fresh:
            meta = TritonAttnMeta(slots=write_slots, fresh_batch=batch, fresh_len=nodes)
            return GraphAttnInputs(meta=meta, kv_lens=torch.zeros(batch, dtype=torch.int32, device=self.device),
                                   block_tables=tables)
        meta = self.uniform_metadata(batch, nodes, tree_mask, [0] * batch, tables, write_slots)
        return GraphAttnInputs(meta=meta, kv_lens=meta.tree_kv_lens, block_tables=tables)

    def mixed_inputs(self, batch: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        """The varlen kernel's inputs as static tensors (all sequences padding until refreshed)."""
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
        varlen = VarlenInputs(q_starts=zeros(batch + 1), kv_lens=zeros(batch), first_tiles=zeros(batch + 1),
                              tables=torch.full((batch, width), self.kv_cache.pad_block, dtype=torch.int32,
                                                device=self.device))
        meta = TritonAttnMeta(slots=write_slots, varlen=varlen, causal_all=True)
        return GraphAttnInputs(meta=meta, kv_lens=varlen.kv_lens, block_tables=varlen.tables,
                               q_starts=varlen.q_starts, first_tiles=varlen.first_tiles)

    def ragged_inputs(self, batch: int, nodes: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        """``ragged_metadata`` on static tensors (all sequences padding until refreshed)."""
        dev = self.device
        q_starts = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
        kv_lens = torch.zeros(batch, dtype=torch.int32, device=dev)
        tables = torch.full((batch, width), self.kv_cache.pad_block, dtype=torch.int32, device=dev)
        masks = torch.zeros(batch, nodes, nodes, dtype=torch.int8, device=dev)
        meta = TritonAttnMeta(slots=write_slots, tree_mask=masks, tree_kv_lens=kv_lens, tree_tables=tables,
                              tree_q_starts=q_starts, tree_all=True)
        return GraphAttnInputs(meta=meta, kv_lens=kv_lens, block_tables=tables, q_starts=q_starts, masks=masks)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TritonAttnMeta) -> torch.Tensor:
        from xformers.ops import fmha

        from engine.kernels.tree_attention import default_splits, paged_tree_attention
        from engine.kernels.varlen_attention import paged_varlen_attention

        self.kv_cache.write(layer, meta.slots, k, v)
        _, h, d = q.shape
        g = k.shape[1]
        hg = h // g
        if meta.fresh_batch:
            from xformers.ops.fmha.attn_bias import LowerTriangularMask

            b, n = meta.fresh_batch, meta.fresh_len
            kf = k.view(b, n, g, 1, d).expand(-1, -1, -1, hg, -1)
            vf = v.view(b, n, g, 1, d).expand(-1, -1, -1, hg, -1)
            of = fmha.memory_efficient_attention_forward(q.view(b, n, g, hg, d), kf, vf,
                                                         attn_bias=LowerTriangularMask())
            return of.reshape(-1, h, d)
        out = torch.empty_like(q)
        if meta.causal_all or meta.causal_idx is not None:
            qc = q if meta.causal_all else q.index_select(0, meta.causal_idx)
            vl = meta.varlen
            oc = paged_varlen_attention(qc, self.kv_cache.k[layer], self.kv_cache.v[layer], vl.tables,
                                        vl.q_starts, vl.kv_lens, vl.first_tiles, self.kv_cache.block_size)
            if meta.causal_all:
                return oc.view(-1, h, d)
            out.index_copy_(0, meta.causal_idx, oc.view(-1, h, d))
        if meta.tree_all or meta.tree_idx is not None:
            rows = (lambda x: x) if meta.tree_all else (lambda x: x.index_select(0, meta.tree_idx))
            trees = meta.tree_kv_lens.shape[0]
            # Split-K by the batch bucket (a graph's batch), so that graph and eager steps of a
            # batch split their prefixes alike and give the same tokens.
            splits = default_splits(padded_batch(trees) or trees, h, g, meta.tree_mask.shape[-1], q.device)
            ot = paged_tree_attention(rows(q), rows(k), rows(v), self.kv_cache.k[layer], self.kv_cache.v[layer],
                                      meta.tree_tables, meta.tree_kv_lens, meta.tree_mask, self.kv_cache.block_size,
                                      splits=splits, q_starts=meta.tree_q_starts)
            if meta.tree_all:
                return ot
            out.index_copy_(0, meta.tree_idx, ot)
        return out
