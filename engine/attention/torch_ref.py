"""Reference attention on any device: gather the paged prefix through the block tables, pad the
batch to [B, Q, P + Q], one scaled_dot_product_attention with an explicit boolean mask.

It is the ground truth the CUDA backend is tested against, and the CPU path of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import StepAttnInputs, write_and_keep, write_plan
from engine.kv_cache import PagedKVCache


@dataclass
class TorchAttnMeta:
    inputs: StepAttnInputs
    write_idx: Optional[torch.Tensor]  # None: every token is written
    write_slots: torch.Tensor
    q_index: torch.Tensor  # [B, Q] flat token index (padding → 0)
    q_valid: torch.Tensor  # [B, Q]
    prefix_slots: torch.Tensor  # [B, P]
    mask: torch.Tensor  # [B, 1, Q, P + Q]


class TorchAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.kv_cache = kv_cache
        self.device = device

    def prepare(self, inputs: StepAttnInputs) -> TorchAttnMeta:
        seqs, dev = inputs.seqs, self.device
        b = len(seqs)
        q_lens = torch.tensor([s.q_len for s in seqs])
        ctx = torch.tensor([s.ctx_len for s in seqs])
        qmax, pmax = int(q_lens.max()), int(ctx.max())
        starts = torch.cumsum(q_lens, 0) - q_lens
        j = torch.arange(qmax)
        q_valid = j[None, :] < q_lens[:, None]
        q_index = torch.where(q_valid, starts[:, None] + j[None, :], torch.zeros_like(j)[None, :])

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

        write_idx, write_slots = write_plan(inputs.slot_mapping, dev)
        return TorchAttnMeta(
            inputs=inputs,
            write_idx=write_idx,
            write_slots=write_slots,
            q_index=q_index.to(dev),
            q_valid=q_valid.to(dev),
            prefix_slots=prefix_slots.to(dev),
            mask=mask[:, None].to(dev),
        )

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TorchAttnMeta) -> torch.Tensor:
        write_and_keep(self.kv_cache, meta.inputs, meta.write_idx, meta.write_slots, layer, k, v)
        kc, vc = self.kv_cache.k[layer], self.kv_cache.v[layer]
        keys = torch.cat([kc[meta.prefix_slots], k[meta.q_index]], dim=1)  # [B, S, KVH, D]
        vals = torch.cat([vc[meta.prefix_slots], v[meta.q_index]], dim=1)
        b, s_len, kvh, d = keys.shape
        qmax, h = meta.q_index.shape[1], q.shape[1]
        g = h // kvh
        # Grouped-query attention without repeating K/V: the g query heads that share a KV
        # head become g extra query rows of that head ([B, KVH, Q*g, D]).
        queries = q[meta.q_index].view(b, qmax, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, qmax * g, d)
        mask = meta.mask.repeat_interleave(g, dim=2)  # [B, 1, Q*g, S]
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask)
        out = out.view(b, kvh, qmax, g, d).permute(0, 2, 1, 3, 4).reshape(b, qmax, h, d)
        return out[meta.q_valid]
