"""CUDA attention through xformers 0.0.35 over the paged cache.

- Prefill chunks and plain decode tokens: K/V are written into the cache first, then one
  ``memory_efficient_attention_forward``, causal from the bottom right. A pure decode step
  (one query per sequence) reads the cache in place (``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``,
  Triton split-K); prefill chunks have no paged kernel in xformers 0.0.35 without FA3 (split-K
  takes only equal query blocks of <= 16), so their K/V are gathered into a padded buffer
  (``BlockDiagonalCausalWithOffsetPaddedKeysMask``, flash).
- Medusa trees: ``xformers.ops.tree_attention.tree_attention`` — the paged prefix (positions
  before the root, all visible, ``PagedBlockDiagonalPaddedKeysMask``) and the tree suffix (the
  step's own K/V under the ancestor mask) merged by log-sum-exp. The prefix op is named
  explicitly (Triton split-K): xformers' automatic choice fails when FA3 is absent.
Grouped-query attention uses xformers' 5-D layout [B, M, G, H/G, D] with K/V expanded along H/G.
Paged Triton split-K needs a page size divisible by 64; the engine checks the block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import GraphAttnInputs, StepAttnInputs, write_and_keep, write_plan
from engine.kv_cache import PagedKVCache


@dataclass
class XformersAttnMeta:
    inputs: StepAttnInputs
    write_idx: Optional[torch.Tensor]
    write_slots: torch.Tensor
    causal_idx: Optional[torch.Tensor]
    causal_bias: object
    # Set unless every causal query block is one token (pure decode): xformers 0.0.35 without
    # FA3 has no paged causal kernel for longer or unequal blocks (split-K takes equal blocks of
    # <= 16), so their K/V are gathered into a padded contiguous buffer.
    causal_gather: Optional[torch.Tensor]
    tree_idx: Optional[torch.Tensor]
    tree_batch: int
    tree_nodes: int
    tree_spec_bias: Optional[torch.Tensor]
    tree_prefix_bias: object
    # Every row of the step is causal (or every row is in a tree): no gather/scatter of rows.
    causal_all: bool = False
    tree_all: bool = False


def _block_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(t) for t in tables))
    out = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)


class XformersAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device) -> None:
        from xformers.ops import fmha  # noqa: F401  (fail at construction, not mid-step)

        if kv_cache.block_size % 64:
            raise ValueError(f"block_size: xformers paged attention needs a multiple of 64, got {kv_cache.block_size}")
        self.kv_cache = kv_cache
        self.device = device

    def prepare(self, inputs: StepAttnInputs) -> XformersAttnMeta:
        from xformers.ops.fmha.attn_bias import (BlockDiagonalCausalWithOffsetPaddedKeysMask,
                                                 PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
                                                 PagedBlockDiagonalPaddedKeysMask)

        dev, page = self.device, self.kv_cache.block_size
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

        causal_bias = causal_gather = None
        if causal:
            kv_lens = [s.ctx_len + s.q_len for s in causal]
            tables = _block_tables([s.block_table for s in causal], dev)
            if all(s.q_len == 1 for s in causal):
                causal_bias = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                    q_seqlen=[s.q_len for s in causal], kv_seqlen=kv_lens, block_tables=tables,
                    page_size=page, device=dev)
            else:
                pad = max(kv_lens)
                pos = torch.arange(pad, device=dev).expand(len(causal), pad)
                pos = torch.minimum(pos, torch.tensor(kv_lens, device=dev)[:, None] - 1)
                causal_gather = self.kv_cache.slots(tables.long(), pos).flatten()
                causal_bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                    q_seqlen=[s.q_len for s in causal], kv_padding=pad, kv_seqlen=kv_lens, device=dev)
        spec_bias = prefix_bias = None
        n_nodes = trees[0].q_len if trees else 0
        if trees:
            if any(s.q_len != n_nodes for s in trees):
                raise ValueError("xformers backend: all trees of a step must have the same size")
            mask = trees[0].tree_mask
            spec_bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))
            spec_bias = spec_bias.to(device=dev, dtype=self.kv_cache.k[0].dtype)
            prefix_bias = PagedBlockDiagonalPaddedKeysMask.from_seqlens(
                q_seqlen=[n_nodes] * len(trees),
                kv_seqlen=[s.ctx_len for s in trees],
                block_tables=_block_tables([s.block_table for s in trees], dev),
                page_size=page, device=dev)

        write_idx, write_slots = write_plan(inputs.slot_mapping, dev)
        return XformersAttnMeta(
            inputs=inputs,
            write_idx=write_idx,
            write_slots=write_slots,
            causal_idx=torch.tensor(causal_rows, device=dev) if causal else None,
            causal_bias=causal_bias, causal_gather=causal_gather,
            tree_idx=torch.tensor(tree_rows, device=dev) if trees else None,
            tree_batch=len(trees), tree_nodes=n_nodes,
            tree_spec_bias=spec_bias, tree_prefix_bias=prefix_bias,
            causal_all=len(causal_rows) == offset, tree_all=len(tree_rows) == offset,
        )

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, keep_kv: bool) -> GraphAttnInputs:
        """Metadata of a step of ``batch`` sequences with ``nodes`` query tokens each (1: plain
        decode; >1: a tree whose root is the pending token), for CUDA graph capture. Shapes are
        fixed (block tables ``width`` pages wide); lengths and tables are refreshed in place."""
        from xformers.ops.fmha.attn_bias import (PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
                                                 PagedBlockDiagonalPaddedKeysMask)

        dev, page = self.device, self.kv_cache.block_size
        tables = torch.full((batch, width), pad_block, dtype=torch.int32, device=dev)
        inputs = StepAttnInputs(seqs=[], slot_mapping=torch.empty(0), keep_kv=keep_kv)
        common = dict(inputs=inputs, write_slots=write_slots, causal_idx=None, causal_gather=None, tree_idx=None,
                      tree_batch=batch, tree_nodes=nodes, tree_spec_bias=None, tree_prefix_bias=None,
                      causal_bias=None)
        if tree_mask is None:
            bias = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=[1] * batch, kv_seqlen=[1] * batch, block_tables=tables, page_size=page, device=dev)
            meta = XformersAttnMeta(**{**common, "causal_bias": bias}, write_idx=None, causal_all=True)
        else:
            # Only each tree's root (the pending token) goes into the cache; its nodes stay in
            # the step's K/V until the accepted path is committed.
            spec_bias = torch.zeros(tree_mask.shape, dtype=torch.float32).masked_fill(~tree_mask, float("-inf"))
            bias = PagedBlockDiagonalPaddedKeysMask.from_seqlens(
                q_seqlen=[nodes] * batch, kv_seqlen=[1] * batch, block_tables=tables, page_size=page, device=dev)
            meta = XformersAttnMeta(**{**common, "tree_spec_bias": spec_bias.to(device=dev, dtype=self.kv_cache.k[0].dtype),
                                       "tree_prefix_bias": bias},
                                    write_idx=torch.arange(batch, device=dev) * nodes, tree_all=True)
        return GraphAttnInputs(meta=meta, kv_lens=bias.k_seqinfo.seqlen, block_tables=tables)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: XformersAttnMeta) -> torch.Tensor:
        from xformers.ops import fmha
        from xformers.ops.fmha import triton_splitk
        from xformers.ops.tree_attention import tree_attention

        write_and_keep(self.kv_cache, meta.inputs, meta.write_idx, meta.write_slots, layer, k, v)
        _, h, d = q.shape
        g = k.shape[1]
        hg = h // g
        cache_k = self.kv_cache.k[layer].view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
        cache_v = self.kv_cache.v[layer].view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
        out = torch.empty_like(q)
        if meta.causal_all or meta.causal_idx is not None:
            qc = (q if meta.causal_all else q.index_select(0, meta.causal_idx)).view(1, -1, g, hg, d)
            if meta.causal_gather is None:
                oc = fmha.memory_efficient_attention_forward(qc, cache_k, cache_v, attn_bias=meta.causal_bias,
                                                             op=triton_splitk.FwOp)
            else:
                kc = self.kv_cache.k[layer].index_select(0, meta.causal_gather)
                vc = self.kv_cache.v[layer].index_select(0, meta.causal_gather)
                kc = kc.view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
                vc = vc.view(1, -1, g, 1, d).expand(-1, -1, -1, hg, -1)
                oc = fmha.memory_efficient_attention_forward(qc, kc, vc, attn_bias=meta.causal_bias)
            if meta.causal_all:
                return oc.view(-1, h, d)
            out.index_copy_(0, meta.causal_idx, oc.view(-1, h, d))
        if meta.tree_all or meta.tree_idx is not None:
            b, n = meta.tree_batch, meta.tree_nodes
            rows = (lambda x: x) if meta.tree_all else (lambda x: x.index_select(0, meta.tree_idx))
            qt = rows(q).view(b, n, g, hg, d)
            kt = rows(k).view(b, n, g, 1, d).expand(-1, -1, -1, hg, -1)
            vt = rows(v).view(b, n, g, 1, d).expand(-1, -1, -1, hg, -1)
            ot = tree_attention(qt, kt, vt, cache_k, cache_v, meta.tree_spec_bias, meta.tree_prefix_bias,
                                prefix_op=triton_splitk.FwOp, suffix_op=triton_splitk.FwOp)
            if meta.tree_all:
                return ot.reshape(-1, h, d)
            out.index_copy_(0, meta.tree_idx, ot.reshape(-1, h, d))
        return out
