"""Reference attention on any device: gather the paged prefix through the block tables and run
scaled_dot_product_attention with an explicit boolean mask (prefix all visible, then the new
tokens' causal or tree mask).

Sequences are grouped so padding stays cheap: all short query blocks (decode tokens, trees)
are padded together into one [B, Q, P + Q] call; every long block (a prefill chunk) runs on
its own, unpadded. It is the ground truth the CUDA backend is tested against, and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import GraphAttnInputs, SeqAttn, StepAttnInputs
from engine.attention.kv_cache import PagedKVCache
from engine.core.shapes import cdiv

# Query blocks up to this long are batched together (covers decode steps and Medusa trees).
SHORT_QUERY = 80
# 16-bit on a CPU (the bf16 mode): every decode or tree token attends as a batch entry of its
# own, over its sequence's prefix and its own path (its ancestors in the step, then itself) —
# the keys a plain decode step at its position reads, at the same indices — padded to its
# position rounded up to INVARIANT_PAGE keys. torch's CPU SDPA changes a query's last bits with
# the number of keys after it, masked or not, and with where its keys sit (docs/performance.md);
# laid out so, a token's output is the same bits alone or in a batch, as a decode token or as
# a tree node. (Prompt chunks longer than SHORT_QUERY attend as a block, as in float32.)
INVARIANT_PAGE = 64


@dataclass
class _Group:
    rows: torch.Tensor  # [n] flat token indices of this group's valid queries, in order
    q_index: torch.Tensor  # [B, Q] flat token index (padding → 0)
    q_valid: torch.Tensor  # [B, Q]
    mask: Optional[torch.Tensor]  # [B, 1, Q, keys]; None: every key visible to every query
    # Where the keys are read, one of the two: eager steps, the slots of all of a query block's
    # keys [B, P + Q] — the prefix's, then the step's own tokens' (written before they are
    # read), so one gather reads them all; fixed-shape steps, the prefix's slots [B, P] (the
    # step's own K/V comes from k and v).
    key_slots: Optional[torch.Tensor] = None
    prefix_slots: Optional[torch.Tensor] = None
    # The group's queries are the step's tokens [0, B·Q) in order (no padding; a long block's
    # may follow): a view replaces the gather of the queries and the selection of the outputs.
    dense: bool = False
    # The mask repeated for grouped queries (``_attend``), made by the first layer of a step.
    _rep_mask: Optional[torch.Tensor] = None
    _rep: int = 0

    def rep_mask(self, n_rep: int) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        if self._rep != n_rep:
            self._rep_mask, self._rep = self.mask.repeat_interleave(n_rep, dim=2), n_rep
        return self._rep_mask


@dataclass
class TorchAttnMeta:
    slots: torch.Tensor  # [T] where each token's K/V is written
    groups: list[_Group]


@dataclass
class TorchStaticMeta:
    """A fixed-shape step (engine/worker/cuda_graphs.py): its group is derived on the device from the
    in-place lengths and tables at every call, so nothing depends on host-side lists. (Eager
    steps keep the exact-width groups above: this backend is the CPU path and the ground
    truth, and its fixed-shape variant only has to mirror what a captured step does.)"""
    slots: torch.Tensor
    batch: int
    nodes: int
    local: torch.Tensor  # [nodes, nodes] bool: the tree mask, or [[True]] for a decode token
    kv_lens: torch.Tensor
    tables: torch.Tensor
    fresh: bool = False  # nothing cached: no prefix to gather (a prompt's first chunk)


@dataclass
class TorchMixedMeta:
    """A mixed step's static inputs (``mixed_inputs``): each token's sequence and position are
    derived from the offsets at every call, and it attends to its sequence's positions up to
    its own through the table — the CPU mirror of the varlen kernel in a captured step."""
    slots: torch.Tensor
    q_starts: torch.Tensor  # [S + 1]
    kv_lens: torch.Tensor  # [S]
    tables: torch.Tensor  # [S, W]


@dataclass
class TorchRaggedMeta:
    """A ragged step's static inputs (``ragged_inputs``): each token's sequence and its index
    among the sequence's tokens are derived from the offsets at every call; it attends to its
    sequence's cached prefix and, among the step's tokens, as its sequence's mask says — the CPU
    mirror of the tree kernel's ragged mode in a captured step."""
    slots: torch.Tensor
    q_starts: torch.Tensor  # [S + 1]
    kv_lens: torch.Tensor  # [S]
    tables: torch.Tensor  # [S, W]
    masks: torch.Tensor  # [S, N, N] bool


class TorchAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.kv_cache = kv_cache
        self.device = device
        # A row's result independent of the batch and the tree around it (``_invariant_groups``).
        self.batch_invariant = device.type == "cpu" and kv_cache.k_all.dtype != torch.float32

    def prepare(self, inputs: StepAttnInputs) -> TorchAttnMeta:
        starts, off = [], 0
        for s in inputs.seqs:
            starts.append(off)
            off += s.q_len
        short = [i for i, s in enumerate(inputs.seqs) if s.q_len <= SHORT_QUERY]
        long = [[i] for i, s in enumerate(inputs.seqs) if s.q_len > SHORT_QUERY]
        slot_mapping = inputs.slot_mapping.long()
        groups, blocks = [], ([short] if short else []) + long
        if self.batch_invariant:  # the short blocks token by token; the long ones as ever
            groups = self._invariant_groups([inputs.seqs[i] for i in short], [starts[i] for i in short], slot_mapping)
            blocks = long
        groups += [self._group([inputs.seqs[i] for i in g], [starts[i] for i in g], slot_mapping) for g in blocks]
        return TorchAttnMeta(slots=inputs.slot_mapping.to(self.device), groups=groups)

    def _group(self, seqs: list[SeqAttn], starts: list[int], slot_mapping: torch.Tensor) -> _Group:
        dev, b = self.device, len(seqs)
        q_lens = torch.tensor([s.q_len for s in seqs])
        ctx = torch.tensor([s.ctx_len for s in seqs])
        qmax, pmax = int(q_lens.max()), int(ctx.max())
        j = torch.arange(qmax)
        q_valid = j[None, :] < q_lens[:, None]
        q_index = torch.where(q_valid, torch.tensor(starts)[:, None] + j[None, :], torch.zeros_like(j)[None, :])

        max_blocks = max(1, max(len(s.block_table) for s in seqs))
        table = torch.zeros(b, max_blocks, dtype=torch.long)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)
        pos = torch.arange(pmax).expand(b, pmax)
        prefix_valid = pos < ctx[:, None]
        prefix_slots = self.kv_cache.slots(table, torch.where(prefix_valid, pos, 0))

        local = torch.tril(torch.ones(qmax, qmax, dtype=torch.bool)).expand(b, qmax, qmax).clone()
        local &= q_valid[:, None, :]
        for i, s in enumerate(seqs):
            if s.tree_mask is not None:
                local[i, : s.q_len, : s.q_len] = s.tree_mask
        # Padding rows see their own (junk) key so no row is all -inf; they are dropped later.
        local |= torch.eye(qmax, dtype=torch.bool)
        mask = torch.cat([prefix_valid[:, None, :].expand(b, qmax, pmax), local], dim=-1)
        dense = bool(q_valid.all()) and starts == [i * qmax for i in range(b)]
        key_slots = torch.cat([prefix_slots, slot_mapping[q_index]], dim=1)
        return _Group(rows=q_index[q_valid].to(dev), q_index=q_index.to(dev), q_valid=q_valid.to(dev),
                      mask=None if bool(mask.all()) else mask[:, None].to(dev), key_slots=key_slots.to(dev), dense=dense)

    def _invariant_groups(self, seqs: list[SeqAttn], starts: list[int], slot_mapping: torch.Tensor) -> list[_Group]:
        """Short query blocks token by token (see ``INVARIANT_PAGE``): a group per key width,
        each token a batch entry of one query."""
        by_width: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for s, start in zip(seqs, starts):
            q, ctx = s.q_len, s.ctx_len
            local = s.tree_mask if s.tree_mask is not None else torch.tril(torch.ones(q, q, dtype=torch.bool))
            # Each token's visible own tokens first, in step order (ancestors before descendants).
            order = torch.sort((~local).to(torch.uint8), dim=1, stable=True).indices
            prefix = self.kv_cache.slots(torch.tensor(s.block_table, dtype=torch.long), torch.arange(ctx))
            keys = torch.cat([prefix.expand(q, ctx), slot_mapping[start + order]], dim=1)  # [Q, ctx + Q]
            counts = ctx + local.sum(1)
            widths = (counts + INVARIANT_PAGE - 1) // INVARIANT_PAGE * INVARIANT_PAGE
            for w in widths.unique().tolist():
                sel = (widths == w).nonzero().flatten()
                k = keys[sel, :w]
                if k.shape[1] < w:  # padding: a key that exists, masked
                    k = torch.cat([k, k[:, :1].expand(-1, w - k.shape[1])], dim=1)
                by_width.setdefault(w, []).append((start + sel, k, counts[sel]))
        dev, groups = self.device, []
        for w, parts in by_width.items():
            rows, key_slots, counts = (torch.cat([p[i] for p in parts]) for i in range(3))
            mask = torch.arange(w)[None, :] < counts[:, None]
            groups.append(_Group(rows=rows.to(dev), q_index=rows[:, None].to(dev),
                                 q_valid=torch.ones(len(rows), 1, dtype=torch.bool, device=dev),
                                 mask=mask[:, None, None, :].to(dev), key_slots=key_slots.to(dev)))
        return groups

    def graph_inputs(self, batch: int, nodes: int, tree_mask: Optional[torch.Tensor], width: int,
                     write_slots: torch.Tensor, pad_block: int, fresh: bool = False) -> GraphAttnInputs:
        dev = self.device
        tables = torch.full((batch, width), pad_block, dtype=torch.int32, device=dev)
        kv_lens = torch.zeros(batch, dtype=torch.int32, device=dev)
        local = tree_mask if tree_mask is not None else torch.ones(1, 1, dtype=torch.bool)
        meta = TorchStaticMeta(slots=write_slots, batch=batch, nodes=nodes, local=local.to(dev),
                               kv_lens=kv_lens, tables=tables, fresh=fresh)
        return GraphAttnInputs(meta=meta, kv_lens=kv_lens, block_tables=tables)

    def mixed_inputs(self, batch: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        dev = self.device
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)  # noqa: E731
        meta = TorchMixedMeta(slots=write_slots, q_starts=zeros(batch + 1), kv_lens=zeros(batch),
                              tables=torch.full((batch, width), self.kv_cache.pad_block, dtype=torch.int32, device=dev))
        return GraphAttnInputs(meta=meta, kv_lens=meta.kv_lens, block_tables=meta.tables, q_starts=meta.q_starts,
                               first_tiles=zeros(batch + 1))

    def ragged_inputs(self, batch: int, nodes: int, width: int, write_slots: torch.Tensor) -> GraphAttnInputs:
        dev = self.device
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)  # noqa: E731
        meta = TorchRaggedMeta(slots=write_slots, q_starts=zeros(batch + 1), kv_lens=zeros(batch),
                               tables=torch.full((batch, width), self.kv_cache.pad_block, dtype=torch.int32, device=dev),
                               masks=torch.zeros(batch, nodes, nodes, dtype=torch.bool, device=dev))
        return GraphAttnInputs(meta=meta, kv_lens=meta.kv_lens, block_tables=meta.tables, q_starts=meta.q_starts,
                               masks=meta.masks)

    def _ragged(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TorchRaggedMeta) -> torch.Tensor:
        """Every token as a batch of one query over its sequence's cached prefix, then its
        sequence's step tokens: [T, span + N] keys."""
        t, h, d = q.shape
        s, n = meta.masks.shape[0], meta.masks.shape[-1]
        starts = meta.q_starts.long()
        token = torch.arange(t, device=q.device)
        seq = torch.searchsorted(starts[1:], token, right=True).clamp(max=s - 1)
        real = token < starts[-1]
        local = (token - starts[seq]).clamp(0, n - 1)
        span = self._span(meta.tables, meta.kv_lens)
        pos = torch.arange(span, device=q.device).expand(t, span)
        # A padding token sees position 0 of some table, so its row is not all masked.
        prefix = (pos < meta.kv_lens[seq].long()[:, None]) & real[:, None] | (pos == 0) & ~real[:, None]
        own = starts[seq][:, None] + torch.arange(n, device=q.device)[None, :]  # [T, N] its sequence's tokens
        mine = meta.masks[seq, local] & real[:, None] & (own < starts[seq + 1][:, None])
        kc, vc = self.kv_cache.gather(layer, self.kv_cache.slots(meta.tables[seq].long(), pos))
        own = own.clamp(max=t - 1)
        keys, vals = torch.cat([kc, k[own]], dim=1), torch.cat([vc, v[own]], dim=1)  # [T, span + N, KVH, D]
        kvh = keys.shape[2]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(t, kvh, h // kvh, d), keys.transpose(1, 2), vals.transpose(1, 2),
            attn_mask=torch.cat([prefix, mine], dim=1)[:, None, None, :])
        return out.reshape(t, h, d)

    def _mixed(self, layer: int, q: torch.Tensor, meta: TorchMixedMeta) -> torch.Tensor:
        """Every token as a batch of one query over its sequence's table: [T, span] keys."""
        t, h, d = q.shape
        s = meta.kv_lens.shape[0]
        starts = meta.q_starts.long()
        token = torch.arange(t, device=q.device)
        seq = torch.searchsorted(starts[1:], token, right=True).clamp(max=s - 1)
        real = token < starts[-1]
        q_pos = meta.kv_lens[seq].long() - (starts[seq + 1] - starts[seq]) + (token - starts[seq])
        span = self._span(meta.tables, meta.kv_lens)
        pos = torch.arange(span, device=q.device).expand(t, span)
        # A padding token sees position 0 of some table, so its row is not all masked.
        visible = (pos <= q_pos[:, None]) & real[:, None] | (pos == 0)
        slots = self.kv_cache.slots(meta.tables[seq].long(), pos)
        keys, vals = self.kv_cache.gather(layer, slots)  # [T, span, KVH, D]
        kvh = keys.shape[2]
        queries = q.view(t, kvh, h // kvh, d)
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=visible[:, None, None, :])
        return out.reshape(t, h, d)

    def _span(self, tables: torch.Tensor, kv_lens: torch.Tensor) -> int:
        """Positions a fixed-shape step's keys are gathered over: the pages its longest sequence
        uses (at least one: a padding sequence sees position 0), not the tables' whole width —
        the graphs' tables are as wide as the longest possible sequence. (This backend is never
        captured, so reading the lengths on the host costs nothing a graph would notice.)"""
        page = self.kv_cache.block_size
        pages = cdiv(int(kv_lens.max()), page) if kv_lens.numel() else 0
        return min(tables.shape[1], max(1, pages)) * page

    def _static_group(self, meta: TorchStaticMeta) -> _Group:
        b, n, dev = meta.batch, meta.nodes, self.device
        span = 0 if meta.fresh else self._span(meta.tables, meta.kv_lens)
        pos = torch.arange(span, device=dev).expand(b, span)
        # The prefix in the cache (a decode token's own slot is attended through ``local``).
        ctx = meta.kv_lens.long()
        prefix_valid = pos < ctx[:, None]
        prefix_slots = self.kv_cache.slots(meta.tables.long(), pos)
        rows = torch.arange(b * n, device=dev)
        mask = torch.cat([prefix_valid[:, None, :].expand(b, n, span), meta.local.expand(b, n, n)], dim=-1)
        return _Group(rows=rows, q_index=rows.view(b, n), q_valid=torch.ones(b, n, dtype=torch.bool, device=dev),
                      mask=mask[:, None], prefix_slots=prefix_slots)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TorchAttnMeta) -> torch.Tensor:
        self.kv_cache.write(layer, meta.slots, k, v)
        if isinstance(meta, TorchMixedMeta):
            return self._mixed(layer, q, meta)
        if isinstance(meta, TorchRaggedMeta):
            return self._ragged(layer, q, k, v, meta)
        if isinstance(meta, TorchStaticMeta):
            return self._attend(layer, q, k, v, self._static_group(meta))
        if len(meta.groups) == 1:
            return self._attend(layer, q, k, v, meta.groups[0])
        out = torch.empty_like(q)
        for g in meta.groups:
            out.index_copy_(0, g.rows, self._attend(layer, q, k, v, g))
        return out

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: _Group) -> torch.Tensor:
        if g.key_slots is not None:  # the step's own K/V is in the cache already (``forward``)
            keys, vals = self.kv_cache.gather(layer, g.key_slots)  # [B, P + Q, KVH, D]
        else:
            kc, vc = self.kv_cache.gather(layer, g.prefix_slots)
            keys = torch.cat([kc, k[g.q_index]], dim=1)  # [B, S, KVH, D]
            vals = torch.cat([vc, v[g.q_index]], dim=1)
        b, _, kvh, d = keys.shape
        qmax, h = g.q_index.shape[1], q.shape[1]
        n_rep = h // kvh
        # Grouped-query attention without repeating K/V: the query heads sharing a KV head
        # become extra query rows of that head ([B, KVH, Q * n_rep, D]).
        queries = q[: b * qmax].view(b, qmax, h, d) if g.dense else q[g.q_index]
        queries = queries.view(b, qmax, kvh, n_rep, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, qmax * n_rep, d)
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=g.rep_mask(n_rep))
        out = out.view(b, kvh, qmax, n_rep, d).permute(0, 2, 1, 3, 4).reshape(b, qmax, h, d)
        return out.view(b * qmax, h, d) if g.dense else out[g.q_valid]
