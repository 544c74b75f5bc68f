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

On CUDA a ResBlock, a sequential head's input (path embeddings through P_d plus h) and the
top-k into the tree's node columns are one Triton launch each (engine/kernels/proposal.py,
topk.py ``topk_into``); elsewhere the same math in torch ops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from engine.kernels import triton_applies
from engine.spec.heads import MedusaHeads
from engine.spec.topk import row_topk, row_topk_probs, topk_into, topk_kernel_applies
from engine.spec.tree import MedusaTree

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
                 proposal_vocab: Optional[list[int]] = None, embed_table: Optional[torch.Tensor] = None) -> None:
        """``embed`` looks token embeddings up (under tensor parallelism: with its all-reduce);
        ``embed_table`` is the whole embedding matrix [V, H] where this rank holds it, which the
        fused sequential proposal reads directly."""
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
        # The Triton programs on CUDA (Triton comes with CUDA torch; the attention backend needs
        # it already).
        self.fused = triton_applies(w)
        self.embed_table = embed_table if self.fused else None
        if self.embed_table is not None and self.path_w is not None:
            self.path_w = [p.contiguous() for p in self.path_w]  # the kernel reads P_d row-major
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
        return self._propose(hidden, roots, False)[0]

    def propose_with_confidence(self, hidden: torch.Tensor, roots: Optional[torch.Tensor] = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``propose``'s candidates [S, C] and, per candidate, its head's probability of it
        (softmax over the proposal vocabulary; a sequential head's given the path above it)
        [S, C] float32 — the adaptive policy's evidence (engine/core/adaptive.py); the same
        top-k as ``propose`` (engine/spec/topk.py ``row_topk_probs``)."""
        return self._propose(hidden, roots, True)

    def _propose(self, hidden: torch.Tensor, roots: Optional[torch.Tensor], with_probs: bool
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.heads.root_conditioned and roots is None:
            raise ValueError(f"propose: {self.heads.kind} heads need each sequence's root token")
        if self.heads.kind == "sequential":
            return self._propose_by_depth(hidden, roots, with_probs)
        k, depth = self.heads.num_heads, self.tree.depth
        x = hidden[None].expand(k, -1, -1)  # [K, S, H]
        if self.root_w is not None:
            r = (self._embed(roots, hidden.dtype) @ self.root_w).view(-1, k, hidden.shape[-1])
            x = x + r.transpose(0, 1)
        for w, b in zip(self.block_w, self.block_b):
            x = self._resblock(x, w, b)
        head, rank = self._tree_index(hidden.device)
        logits = self._logits(x[:depth])  # heads deeper than the tree idle
        if not with_probs:
            return row_topk(logits, self.tree.topk, self.vocab_ids).transpose(0, 1)[:, head, rank], None
        top, probs = row_topk_probs(logits, self.tree.topk, self.vocab_ids)  # [D, S, k] each
        return top.transpose(0, 1)[:, head, rank], probs.transpose(0, 1)[:, head, rank]

    def _propose_by_depth(self, hidden: torch.Tensor, roots: torch.Tensor, with_probs: bool
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Sequential heads: depth d's candidates come from head d-1 run once per parent node,
        reading the root and the candidates on the path to that parent."""
        s = hidden.shape[0]
        tokens = torch.empty((s, self.tree.num_nodes), dtype=torch.long, device=hidden.device)  # node order
        tokens[:, 0] = roots
        probs = torch.ones((s, self.tree.num_nodes), dtype=torch.float32, device=hidden.device) if with_probs else None
        k = self.tree.topk
        for d, idx in enumerate(self._depth_index(hidden.device), start=1):
            x = self._path_input(tokens, idx.anc, hidden, d)  # [S·P, H], row s·P + p
            for w, b in zip(self.block_w, self.block_b):
                x = self._resblock(x[None], w[d - 1:d], b[d - 1:d])[0]
            logits = self._logits(x, d - 1)
            if topk_kernel_applies(logits, k):  # (CUDA logits: the fused proposer's)
                topk_into(logits, k, self.vocab_ids, tokens, idx.dest, probs)
            elif probs is not None:
                top, p = row_topk_probs(logits, k, self.vocab_ids)
                tokens[:, idx.nodes] = top.view(s, -1, k)[:, idx.slot, idx.rank]
                probs[:, idx.nodes] = p.view(s, -1, k)[:, idx.slot, idx.rank]
            else:
                top = row_topk(logits, k, self.vocab_ids).view(s, -1, k)
                tokens[:, idx.nodes] = top[:, idx.slot, idx.rank]
        return tokens[:, 1:], probs[:, 1:] if probs is not None else None

    def _resblock(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x [G, M, H] → x + SiLU(x W_g + b_g) for G heads at once."""
        if self.fused:
            from engine.kernels.proposal import resblock

            return resblock(x, w, b)
        return x + nn.functional.silu(torch.baddbmm(b, x, w))

    def _path_input(self, tokens: torch.Tensor, anc: torch.Tensor, hidden: torch.Tensor, d: int) -> torch.Tensor:
        """Head d-1's input for each (sequence, parent at depth d-1): h + [e(root); …] P_d."""
        if self.embed_table is not None:
            from engine.kernels.proposal import path_input

            return path_input(tokens, anc, self.embed_table, self.path_w[d - 1], hidden)
        s, p = hidden.shape[0], anc.shape[0]
        path = self._embed(tokens[:, anc].flatten(), hidden.dtype).view(s, p, -1)  # [S, P, d·H]
        return (hidden[:, None, :] + path @ self.path_w[d - 1]).flatten(0, 1)

    def _embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed(ids).to(dtype)

    def _logits(self, x: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        """x [..., H] → the heads' logits over the proposal vocabulary. Unshared projections:
        head ``head``'s, or (``head`` None) x [D, S, H] holds heads 0…D-1 along dim 0."""
        if self.proj_w is None:
            return self.base_lm_head(x)
        if self.proj_w.dim() == 2:
            return x @ self.proj_w
        if head is None:
            return torch.bmm(x, self.proj_w[: x.shape[0]])
        return x @ self.proj_w[head]

    def _tree_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """node_head, node_rank on the proposer's device, made once per tree (no host→device
        copy per step, none inside a CUDA graph capture, where it is not allowed)."""
        key = ("nodes", self.tree, device)
        if key not in self._index:
            self._index[key] = self.tree.node_head.to(device), self.tree.node_rank.to(device)
        return self._index[key]

    def _depth_index(self, device: torch.device) -> list["DepthIndex"]:
        """Per depth d, on ``device``, made once per tree: which parents head d-1 reads and where
        its winners go (``DepthIndex``)."""
        key = ("depths", self.tree, device)
        if key not in self._index:
            tree, k, out = self.tree, self.tree.topk, []
            for d in range(1, tree.depth + 1):
                kids = [i for i in range(1, tree.num_nodes) if tree.depths[i] == d]
                parents = sorted({tree.parents[i] for i in kids})
                slot = [parents.index(tree.parents[i]) for i in kids]
                rank = [tree.choices[i - 1][-1] for i in kids]
                dest = [[-1] * k for _ in parents]
                for node, p, r in zip(kids, slot, rank):
                    dest[p][r] = node
                out.append(DepthIndex(*(torch.tensor(v, dtype=torch.long, device=device)
                                        for v in ([tree.node_paths[p] for p in parents], kids, slot, rank, dest))))
            self._index[key] = out
        return self._index[key]


@dataclass(frozen=True)
class DepthIndex:
    """One depth d of a tree, for sequential heads: the P parent nodes at depth d-1 that have
    children, and their children (the nodes at depth d)."""
    anc: torch.Tensor  # [P, d]: each parent's path of node ids, root first (what head d-1 reads)
    nodes: torch.Tensor  # [N_d]: the nodes at depth d ...
    slot: torch.Tensor  # [N_d]: ... each one's parent, as a row of anc ...
    rank: torch.Tensor  # [N_d]: ... and its rank among that parent's top-k
    dest: torch.Tensor  # [P, k]: the same from the parent's side: rank r's node, or -1
