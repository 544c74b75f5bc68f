"""CUDA attention through xformers 0.0.35 over the paged cache.

- Prefill chunks and plain decode tokens: K/V are written into the cache first, then the
  attention reads the cache in place, causal from the bottom right. A pure decode step (one
  query per sequence) goes through xformers (``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``,
  Triton split-K). A step with prefill chunks goes through this engine's varlen kernel
  (engine/attention/varlen_kernel.py: xformers 0.0.35 without FA3 has no paged kernel for
  unequal query blocks, and gathering their K/V into a padded buffer for its flash kernel
  could not be captured), eagerly or in a mixed step's CUDA graph (``mixed_inputs``).
- A graph of fresh prompts (nothing cached, each padded to one length): flash attention,
  causal within each prompt's block.
- Medusa trees: one Triton kernel per layer (engine/attention/tree_kernel.py) streams the
  paged prefix (positions before the root, all visible) and then the tree (the step's own K/V
  under the ancestor mask) through one online softmax. xformers' ``tree_attention`` did the
  same as two split-K attentions and a log-sum-exp merge, five launches per layer.
Grouped-query attention uses xformers' 5-D layout [B, M, G, H/G, D] with K/V expanded along H/G.
Paged Triton split-K needs a page size divisible by 64; the engine checks the block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Optional

import torch

from engine.attention.base import GraphAttnInputs, StepAttnInputs, block_tables, tile_starts, uniform_shape
from engine.kv_cache import PagedKVCache


@dataclass
class XformersAttnMeta:
    slots: torch.Tensor  # [T] where each token's K/V is written
    causal_idx: Optional[torch.Tensor] = None
    causal_bias: object = None  # pure decode: xformers' paged split-K
    # Otherwise (prefill chunks among the causal rows): the varlen kernel's inputs.
    varlen: Optional["VarlenInputs"] = None
    tree_idx: Optional[torch.Tensor] = None
    tree_mask: Optional[torch.Tensor] = None  # [N, N] int8, 1 = may attend
    tree_kv_lens: Optional[torch.Tensor] = None  # [B] int32: cached positions before each root
    tree_tables: Optional[torch.Tensor] = None  # [B, W] int32
    # Every row of the step is causal (or every row is in a tree): no gather/scatter of rows.
    causal_all: bool = False
    tree_all: bool = False
    # A graph step of fresh prompts (nothing cached): ``fresh_batch`` blocks of ``fresh_len``
    # tokens, causal within each block (flash, no lengths or tables to read).
    fresh_batch: int = 0
    fresh_len: int = 0


@dataclass
class VarlenInputs:
    """engine/attention/varlen_kernel.py's per-sequence inputs, int32 on the device."""
    q_starts: torch.Tensor  # [S + 1]
    kv_lens: torch.Tensor  # [S]
    first_tiles: torch.Tensor  # [S + 1]
    tables: torch.Tensor  # [S, W]


class XformersAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device) -> None:
        from xformers.ops import fmha  # noqa: F401  (fail at construction, not mid-step)

        from engine.attention import tree_kernel, varlen_kernel  # noqa: F401  (Triton, which xformers' split-K needs too)

        if kv_cache.block_size % 64:
            raise ValueError(f"block_size: xformers paged attention needs a multiple of 64, got {kv_cache.block_size}")
        self.kv_cache = kv_cache
        self.device = device
        # Tree masks on the device by mask (trees live for the engine's lifetime): made once.
        self._tree_masks: dict[torch.Tensor, torch.Tensor] = {}

    def _tree_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if mask not in self._tree_masks:
            self._tree_masks[mask] = mask.to(device=self.device, dtype=torch.int8).contiguous()
        return self._tree_masks[mask]

    def uniform_metadata(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], kv_lens: list[int],
                         tables: torch.Tensor, slots: torch.Tensor) -> XformersAttnMeta:
        """Every sequence runs one pending token (``tree_mask`` None; ``kv_lens`` include it) or
        its pending token plus the same ``nodes``-node tree (``kv_lens``: the prefix before the
        root). Pending tokens read the cache in place (paged Triton split-K); trees go through
        the fused tree kernel (paged prefix + tree in one online softmax)."""
        from xformers.ops.fmha.attn_bias import PagedBlockDiagonalCausalWithOffsetPaddedKeysMask

        page = self.kv_cache.block_size
        if tree_mask is None:
            bias = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=[1] * batch, kv_seqlen=kv_lens, block_tables=tables, page_size=page, device=self.device)
            return XformersAttnMeta(slots=slots, causal_bias=bias, causal_all=True)
        return XformersAttnMeta(slots=slots, tree_mask=self._tree_mask(tree_mask), tree_tables=tables,
                                tree_kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=self.device),
                                tree_all=True)

    def prepare(self, inputs: StepAttnInputs) -> XformersAttnMeta:
        dev = self.device
        slots = inputs.slot_mapping.to(dev)
        shape = uniform_shape(inputs.seqs)
        if shape is not None:
            nodes, mask = shape
            extra = 1 if mask is None else 0
            return self.uniform_metadata(len(inputs.seqs), nodes, mask, [s.ctx_len + extra for s in inputs.seqs],
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

        meta = XformersAttnMeta(slots=slots)
        if causal:
            kv_lens = [s.ctx_len + s.q_len for s in causal]
            tables = block_tables([s.block_table for s in causal], dev)
            if all(s.q_len == 1 for s in causal):
                meta = self.uniform_metadata(len(causal), 1, None, kv_lens, tables, slots)
            else:
                q_lens = [s.q_len for s in causal]
                starts = torch.tensor([0] + list(accumulate(q_lens)), dtype=torch.int32)
                host = torch.stack([starts, torch.tensor(tile_starts(q_lens), dtype=torch.int32)]).to(dev)
                meta.varlen = VarlenInputs(q_starts=host[0], kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
                                           first_tiles=host[1], tables=tables)
            meta.causal_idx = torch.tensor(causal_rows, device=dev)
            meta.causal_all = len(causal_rows) == offset
        if trees:
            n_nodes = trees[0].q_len
            if any(s.q_len != n_nodes for s in trees):
                raise ValueError("xformers backend: all trees of a step must have the same size")
            tree = self.uniform_metadata(len(trees), n_nodes, trees[0].tree_mask, [s.ctx_len for s in trees],
                                         block_tables([s.block_table for s in trees], dev), slots)
            meta.tree_mask, meta.tree_kv_lens, meta.tree_tables = tree.tree_mask, tree.tree_kv_lens, tree.tree_tables
            meta.tree_idx = torch.tensor(tree_rows, device=dev)
            meta.tree_all = len(tree_rows) == offset
        return meta

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, fresh: bool = False) -> GraphAttnInputs:
        """``uniform_metadata`` on static tensors for CUDA graph capture: block tables ``width``
        pages wide (all the pad block until refreshed) and the bias's own length tensor, both
        refreshed in place before each replay. ``fresh`` prompts need neither."""
        tables = torch.full((batch, width), pad_block, dtype=torch.int32, device=self.device)
        if fresh:
            meta = XformersAttnMeta(slots=write_slots, fresh_batch=batch, fresh_len=nodes)
            return GraphAttnInputs(meta=meta, kv_lens=torch.zeros(batch, dtype=torch.int32, device=self.device),
                                   block_tables=tables)
        meta = self.uniform_metadata(batch, nodes, tree_mask, [1] * batch, tables, write_slots)
        kv_lens = meta.causal_bias.k_seqinfo.seqlen if tree_mask is None else meta.tree_kv_lens
        return GraphAttnInputs(meta=meta, kv_lens=kv_lens, block_tables=tables)

    def mixed_inputs(self, batch: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        """The varlen kernel's inputs as static tensors (all sequences padding until refreshed)."""
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
        varlen = VarlenInputs(q_starts=zeros(batch + 1), kv_lens=zeros(batch), first_tiles=zeros(batch + 1),
                              tables=torch.full((batch, width), self.kv_cache.pad_block, dtype=torch.int32,
                                                device=self.device))
        meta = XformersAttnMeta(slots=write_slots, varlen=varlen, causal_all=True)
        return GraphAttnInputs(meta=meta, kv_lens=varlen.kv_lens, block_tables=varlen.tables,
                               q_starts=varlen.q_starts, first_tiles=varlen.first_tiles)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: XformersAttnMeta) -> torch.Tensor:
        from xformers.ops import fmha
        from xformers.ops.fmha import triton_splitk

        from engine.attention.tree_kernel import default_splits, paged_tree_attention
        from engine.attention.varlen_kernel import paged_varlen_attention
        from engine.cuda_graphs import padded_batch

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
        cache_k = self.kv_cache.k[layer].view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
        cache_v = self.kv_cache.v[layer].view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
        out = torch.empty_like(q)
        if meta.causal_all or meta.causal_idx is not None:
            qc = q if meta.causal_all else q.index_select(0, meta.causal_idx)
            if meta.varlen is None:
                oc = fmha.memory_efficient_attention_forward(qc.view(1, -1, g, hg, d), cache_k, cache_v,
                                                             attn_bias=meta.causal_bias, op=triton_splitk.FwOp)
            else:
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
            splits = default_splits(padded_batch(trees) or trees, h, g, meta.tree_mask.shape[0], q.device)
            ot = paged_tree_attention(rows(q), rows(k), rows(v), self.kv_cache.k[layer], self.kv_cache.v[layer],
                                      meta.tree_tables, meta.tree_kv_lens, meta.tree_mask, self.kv_cache.block_size,
                                      splits=splits)
            if meta.tree_all:
                return ot
            out.index_copy_(0, meta.tree_idx, ot)
        return out
