"""A decided sequence: what a verify or decode step keeps, on the device and on the host.

A device decision (``SpecTail.greedy`` / ``SpecTail.sampled``, and the Triton decision kernels
of engine/kernels/decision.py, which write the same layout) returns one int64 row per sequence:

    [n_acc, tok_1 … tok_D, bonus, row]

- ``n_acc``: how many tree candidates were accepted;
- ``tok_1 … tok_D``: their tokens, root's child first (D is the tree's depth, 0 without a
  tree; entries past ``n_acc`` are padding);
- ``bonus``: the model's own token after the last accepted node;
- ``row``: the flat row of the step's hidden states at that node, where the heads read the
  next proposal.

This module is the one place that layout is written down: the device side packs and reads it
with ``pack_rows`` / ``bonus_tokens`` / ``last_rows``, the host side with ``Decided.from_row``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_rows(n_acc: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The decided rows [B, 1 + D + 2] from n_acc [B], accepted tokens [B, D], bonus [B] and
    the last accepted node's hidden-state row [B]."""
    return torch.cat([n_acc[:, None], accepted, bonus[:, None], row[:, None]], dim=1)


def bonus_tokens(rows: torch.Tensor) -> torch.Tensor:
    """Each sequence's bonus token [B] (the next step's pending token)."""
    return rows[:, -2]


def last_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each sequence's hidden-state row at its last accepted node [B]."""
    return rows[:, -1]


@dataclass(frozen=True)
class Decided:
    """One sequence's decision on the host."""
    num_accepted: int
    tokens: list[int]  # the accepted candidates, then the bonus token

    @classmethod
    def from_row(cls, row: list[int], depth: int) -> "Decided":
        """A decided row (host list) of a step whose tree has ``depth`` levels (0: no tree)."""
        n = row[0]
        return cls(n, row[1:1 + n] + [row[1 + depth]])

    def accepted_per_depth(self, depth: int) -> list[int]:
        """Per tree depth, was a candidate accepted there (per-head acceptance counters)."""
        return [int(self.num_accepted > d) for d in range(depth)]
