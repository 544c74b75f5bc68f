"""Medusa proposer: the heads' top-k at each sequence's last accepted position → one candidate
token for every tree node (batched: one gather, no loop over nodes; sequential heads: one pass
per tree depth, each parent node's children from its own path).

The proposer holds the heads in the form a step wants, made once at start-up:
- the K heads' ResBlocks stacked into one [K, H, H] batched GEMM per layer (one kernel for all
  heads instead of K);
- the vocabulary projection restricted to a *proposal vocabulary* when the heads ship one
  (``proposal_vocab.json``: the tokens that cover nearly all of the self-distilled text, the
  FR-Spec idea). The heads' projection over 49,152 rows is as many multiply-adds as the whole
  135M model's layers; over 8,192 rows it is a sixth of that. Output stays exact: only which
  candidates are proposed changes; the model still verifies them against its full-vocabulary
  logits. A token outside the proposal vocabulary is simply never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from spec_decode.heads import MedusaHeads
from spec_decode.topk import row_topk
from spec_decode.tree import MedusaTree

PROPOSAL_VOCAB_FILE = "proposal_vocab.json"


def read_proposal_vocab(heads_dir: Path, vocab_size: int) -> Optional[list[int]]:
    """The heads' proposal vocabulary (token ids), or None when the directory has none."""
    f = Path(heads_dir) / PROPOSAL_VOCAB_FILE
    if not f.is_file():
        return None
    ids = json.loads(f.read_text()).get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"heads: {f} needs 'token_ids', a non-empty list of token ids < {vocab_size}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"heads: {f} lists a token id twice")
    return ids


class MedusaProposer:
    def __init__(self, heads: MedusaHeads, tree: MedusaTree, base_lm_head: nn.Linear,
                 embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 proposal_vocab: Optional[list[int]] = None) -> None:
        if tree.depth > heads.num_heads:
            raise ValueError(f"tree: depth {tree.depth} needs {tree.depth} heads, the heads have {heads.num_heads}")
        if heads.root_conditioned and embed is None:
            raise ValueError("heads: root-conditioned heads need the base model's token embedding")
        self.heads, self.tree, self.base_lm_head, self.embed = heads, tree, base_lm_head, embed
        # Per tree: index tensors on the device (see _tree_index, _depth_index).
        self._index: dict = {}
        w = next(heads.parameters()).detach()
        blocks = [[head[i].linear for head in heads.heads] for i in range(heads.num_layers)]
        # [K, H_in, H_out] so that x [K, S, H] @ W is every head's linear at once.
        self.block_w = [torch.stack([l.weight.detach().t() for l in layer]) for layer in blocks]
        self.block_b = [torch.stack([l.bias.detach() for l in layer])[:, None, :] for layer in blocks]
        # P_k transposed: [c·H, H] per head; root-conditioned heads' side by side, [H, K·H].
        self.path_w = [p.weight.detach().t() for p in heads.path_proj] if heads.path_proj is not None else None
        self.root_w = torch.cat(self.path_w, dim=1) if heads.kind == "root_conditioned" else None
        self.vocab_ids: Optional[torch.Tensor] = None
        if heads.shared_lm_head:
            full = base_lm_head.weight.detach()
            tp = getattr(base_lm_head, "tp", None)
            if proposal_vocab is not None and tp is not None and tp.world_size > 1:
                # Vocab-parallel lm_head: gather the whole matrix once to take the subset's rows.
                full = tp.all_gather_vocab(full.t().contiguous()).t()
            if proposal_vocab is not None:
                self.vocab_ids = torch.tensor(proposal_vocab, dtype=torch.long, device=w.device)
                self.proj_w = full.index_select(0, self.vocab_ids).t().contiguous()  # [H, V']
            else:
                self.proj_w = None  # the base lm_head itself (vocab-parallel under TP)
        else:
            rows = torch.stack([head[-1].weight.detach() for head in heads.heads])  # [K, V, H]
            if proposal_vocab is not None:
                self.vocab_ids = torch.tensor(proposal_vocab, dtype=torch.long, device=w.device)
                rows = rows.index_select(1, self.vocab_ids)
            self.proj_w = rows.transpose(1, 2).contiguous()  # [K, H, V']

    @property
    def proposal_vocab_size(self) -> int:
        return self.heads.vocab_size if self.vocab_ids is None else len(self.vocab_ids)

    def propose(self, hidden: torch.Tensor, roots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [S, H] at the last accepted token of S sequences, roots [S] the token the model
        chose there (the next step's pending token) → candidates [S, C] for the full tree."""
        if self.heads.root_conditioned and roots is None:
            raise ValueError(f"propose: {self.heads.kind} heads need each sequence's root token")
        if self.heads.kind == "sequential":
            return self._propose_by_depth(hidden, roots)
        k, depth = self.heads.num_heads, self.tree.depth
        x = hidden[None].expand(k, -1, -1)  # [K, S, H]
        if self.root_w is not None:
            r = (self._embed(roots, hidden.dtype) @ self.root_w).view(-1, k, hidden.shape[-1])
            x = x + r.transpose(0, 1)
        for w, b in zip(self.block_w, self.block_b):
            x = x + nn.functional.silu(torch.baddbmm(b, x, w))
        top = self._topk(x[:depth]).transpose(0, 1)  # [S, D, k]; heads deeper than the tree idle
        head, rank = self._tree_index(hidden.device)
        return top[:, head, rank]

    def _propose_by_depth(self, hidden: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """Sequential heads: depth d's candidates come from head d-1 run once per parent node,
        reading the root and the candidates on the path to that parent."""
        tokens = roots[:, None]  # [S, nodes so far], node order (depth by depth)
        for d, (anc, slot, rank) in enumerate(self._depth_index(hidden.device), start=1):
            s, p = hidden.shape[0], anc.shape[0]
            path = self._embed(tokens[:, anc].flatten(), hidden.dtype).view(s, p, -1)  # [S, P, d·H]
            x = hidden[:, None, :] + path @ self.path_w[d - 1]  # [S, P, H]
            for w, b in zip(self.block_w, self.block_b):
                x = x + nn.functional.silu(torch.addmm(b[d - 1], x.flatten(0, 1), w[d - 1]).view_as(x))
            top = self._topk(x, d - 1)  # [S, P, k]
            tokens = torch.cat([tokens, top[:, slot, rank]], dim=1)
        return tokens[:, 1:]

    def _embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed(ids).to(dtype)

    def _topk(self, x: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        """x [..., H] → the tree's top-k token ids [..., k] over the proposal vocabulary. Unshared
        projections: head k's, or (``head`` None) x [D, S, H] holds heads 0…D-1 along dim 0."""
        if self.proj_w is None:
            logits = self.base_lm_head(x)
        elif self.proj_w.dim() == 2:
            logits = x @ self.proj_w
        elif head is None:
            logits = torch.bmm(x, self.proj_w[: x.shape[0]])
        else:
            logits = x @ self.proj_w[head]
        return row_topk(logits, self.tree.topk, self.vocab_ids)

    def _tree_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """node_head, node_rank on the proposer's device, made once per tree (no host→device
        copy per step, none inside a CUDA graph capture, where it is not allowed)."""
        key = ("nodes", self.tree, device)
        if key not in self._index:
            self._index[key] = self.tree.node_head.to(device), self.tree.node_rank.to(device)
        return self._index[key]

    def _depth_index(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per depth d: the ancestors (root first) of every parent node at depth d-1 [P, d], and
        for every node at depth d its parent's slot among them and its rank."""
        key = ("depths", self.tree, device)
        if key not in self._index:
            tree, out = self.tree, []
            for d in range(1, tree.depth + 1):
                kids = [i for i in range(1, tree.num_nodes) if tree.depths[i] == d]
                parents = sorted({tree.parents[i] for i in kids})
                anc = [tree.node_paths[p] for p in parents]
                slot = [parents.index(tree.parents[i]) for i in kids]
                rank = [tree.choices[i - 1][-1] for i in kids]
                out.append(tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (anc, slot, rank)))
            self._index[key] = out
        return self._index[key]
