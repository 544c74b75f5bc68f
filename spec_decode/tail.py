"""The end of a speculative step — decide, commit, propose — in one place.

After the forward, every sequence that samples needs: a decision (which tree path is accepted,
and the bonus token after it), the commit of the accepted nodes' K/V from the cache's scratch
region into the sequence's own slots (only accepted tokens ever live in request blocks), and
the heads' proposals for the next step, read at the last accepted token.

``SpecTail.greedy`` does all three on the device for a uniform step of greedy sequences
(B sequences × N nodes, no host round trip): the eager runner calls it, and the CUDA graph
runner captures the very same function after the forward graph. Steps it cannot take
(sampled requests, logprobs, min_tokens masking, mixed prefill) decide on the host with the
acceptance rules (spec_decode/acceptance.py) and then call the same ``commit`` and
``propose``.

Greedy decision, per sequence: along every root-to-leaf path, a candidate is accepted while it
equals the model's argmax at its parent; the first longest path wins; the bonus token is the
argmax at the last accepted node. Output equals plain greedy decoding token for token.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.kv_cache import PagedKVCache
from spec_decode.acceptance import greedy_tree_accept
from spec_decode.proposer import MedusaProposer
from spec_decode.tree import MedusaTree


class SpecTail:
    def __init__(self, kv_cache: PagedKVCache, lm_head: Callable[[torch.Tensor], torch.Tensor],
                 proposer: Optional[MedusaProposer]) -> None:
        self.kv_cache, self.lm_head, self.proposer = kv_cache, lm_head, proposer
        # Device copies of each tree's paths, made outside any graph capture (a host→device
        # copy cannot be captured) and kept alive for the graphs that read them.
        self._paths: dict[tuple[MedusaTree, torch.device], torch.Tensor] = {}

    def commit(self, step_rows: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy the K/V of the step's rows ``step_rows`` (their scratch slots) to ``dst_slots``,
        every layer at once."""
        self.kv_cache.copy_slots(step_rows + self.kv_cache.scratch_slot0, dst_slots)

    def propose(self, hidden: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] at each sequence's last accepted token, roots [S] the token chosen there
        (the next step's pending token) → the full tree's candidates [S, C]."""
        return self.proposer.propose(hidden, roots)

    def paths(self, tree: MedusaTree, device: torch.device) -> torch.Tensor:
        key = (tree, device)
        if key not in self._paths:
            self._paths[key] = tree.paths.to(device)
        return self._paths[key]

    def greedy(self, hidden: torch.Tensor, tree: Optional[MedusaTree], tokens: torch.Tensor,
               start: torch.Tensor, tables: torch.Tensor, propose: bool) -> torch.Tensor:
        """A uniform greedy step on the device. hidden [B*N, H] (sequence after sequence, N =
        the tree's nodes or 1), tokens [B, N] (the pending token, then the candidates), start
        [B, 1] (the pending token's position), tables [B, W] (block tables, padded with any
        block). Returns [B, 1 + depth + 1 + C] int64: accepted count, the accepted tokens
        (padded to the tree depth), the bonus token, then C next candidates (C = 0 without
        ``propose``)."""
        b, n = tokens.shape
        dev = hidden.device
        argmax = self.lm_head(hidden).argmax(-1).view(b, n)
        seq = torch.arange(b, device=dev)
        if tree is None:
            n_acc = torch.zeros(b, dtype=torch.long, device=dev)
            last = n_acc[:, None]
            accepted = tokens[:, :0]
        else:
            paths = self.paths(tree, dev)
            best, n_acc = greedy_tree_accept(paths, tokens, argmax)
            path = paths[best].clamp(min=0)  # [b, depth + 1]
            last = path.gather(1, n_acc[:, None])
            accepted = tokens.gather(1, path[:, 1:])
            # The accepted node at depth d goes to position start + d; rejected ones to the pad
            # slot, so the commit has the same shape every step.
            steps = torch.arange(1, tree.depth + 1, device=dev)
            page = self.kv_cache.block_size
            dst = self.kv_cache.slots(tables, (start + steps).clamp(max=tables.shape[1] * page - 1))
            dst = torch.where(steps[None, :] <= n_acc[:, None], dst, self.kv_cache.pad_slot)
            self.commit((seq[:, None] * n + path[:, 1:]).flatten(), dst.flatten())
        bonus = argmax.gather(1, last)
        parts = [n_acc[:, None], accepted, bonus]
        if propose:
            parts.append(self.propose(hidden.index_select(0, seq * n + last[:, 0]), bonus[:, 0]))
        return torch.cat(parts, dim=1)
