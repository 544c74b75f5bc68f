"""Medusa proposer: the heads' top-k at each sequence's last accepted position → one candidate
token for every tree node (batched: one gather, no loop over nodes)."""

from __future__ import annotations

import torch
from torch import nn

from spec_decode.heads import MedusaHeads
from spec_decode.tree import MedusaTree


class MedusaProposer:
    def __init__(self, heads: MedusaHeads, tree: MedusaTree, base_lm_head: nn.Linear) -> None:
        if tree.depth > heads.num_heads:
            raise ValueError(f"tree: depth {tree.depth} needs {tree.depth} heads, the heads have {heads.num_heads}")
        self.heads, self.tree, self.base_lm_head = heads, tree, base_lm_head
        # (tree, device) → node_head, node_rank there: no host→device copy per step (and none
        # inside a CUDA graph capture, where it is not allowed).
        self._index: dict = {}

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] at the last accepted token of S sequences → candidates [S, N-1]."""
        logits = self.heads.logits(hidden, self.base_lm_head)  # [S, K, V]
        top = torch.topk(logits[:, : self.tree.depth], self.tree.topk, dim=-1).indices  # [S, D, k]
        key = (self.tree, top.device)
        if key not in self._index:
            self._index[key] = self.tree.node_head.to(top.device), self.tree.node_rank.to(top.device)
        head, rank = self._index[key]
        return top[:, head, rank]
