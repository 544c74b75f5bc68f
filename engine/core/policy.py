"""How much the scheduler speculates each step: the speculation policy.

The scheduler asks it two things per step — which tree the decoding sequences verify (named
by its number of candidates, a key of the engine's tree set; 0: plain decoding) and whether
the step should propose candidates for the next one — and tells it what served steps cost.
Without back-off the answer is always the full tree; with back-off (engine/core/backoff.py)
it follows a latency model measured on the device and the heads' measured acceptance. With
adaptive trees (engine/core/adaptive.py) there is no one tree a step: the scheduler asks
``adaptive.plan`` for each sequence's own.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.core.adaptive import AdaptiveTrees
from engine.core.backoff import BackoffPolicy


class SpeculationPolicy:
    def __init__(self, subtrees: dict[int, Sequence[int]], backoff: Optional[BackoffPolicy] = None,
                 adaptive: Optional[AdaptiveTrees] = None) -> None:
        """``subtrees``: candidate count → indices of that tree's candidates among the full tree's
        (the full tree maps to all of them). ``adaptive``: per-sequence trees instead of one
        size a step (exclusive with ``backoff``)."""
        if backoff is not None and adaptive is not None:
            raise ValueError("speculation policy: back-off and adaptive trees are exclusive")
        self.subtrees = {n: tuple(nodes) for n, nodes in subtrees.items()}
        self.full = max(self.subtrees)
        self.backoff, self.adaptive = backoff, adaptive
        # Engine steps per tree size (0 = plain) among steps in which sequences decoded.
        self.steps_by_tree_size: dict[int, int] = {}

    def tree_for(self, num_decoding: int, token_budget: int, route: str = "greedy") -> int:
        """The tree size for a step in which ``num_decoding`` sequences decode (``route``: how the
        step decides — engine/sample/sampler.py ``decision_route`` — which back-off prices on its own)."""
        if self.backoff is None:
            return self.full
        if num_decoding <= 0:
            return 0
        return self.backoff.choose(num_decoding, token_budget // num_decoding - 1, route)

    def cut(self, n: int, candidates: Sequence[int]) -> list[int]:
        """A sequence's full-tree candidates cut down to the n-candidate tree."""
        if n == self.full:
            return list(candidates)
        return [candidates[i] for i in self.subtrees[n]] if n else []

    def propose_next(self, num_sampling: int, token_budget: int, route: str = "greedy") -> bool:
        """Should this step's heads propose for the next one? Not when the next step, with as
        many sequences, would decode plainly anyway: back-off would choose no tree, or (the full
        tree without back-off) the trees would not fit the step's token budget. Proposals nobody
        reads cost a plain step a third of its time (H100, batch 64: 2.83 vs 2.13 ms)."""
        if num_sampling <= 0:
            return False
        if self.adaptive is not None:
            return self.adaptive.propose_next(num_sampling, route)
        if self.backoff is None:
            return num_sampling * (1 + self.full) <= token_budget
        return self.tree_for(num_sampling, token_budget, route) > 0

    def record(self, n: int) -> None:
        self.steps_by_tree_size[n] = self.steps_by_tree_size.get(n, 0) + 1

    def observe(self, batch_size: int, n: int, ms: float, tokens_per_seq: float, route: str = "greedy") -> None:
        """A pure decode step with n-candidate trees on every sequence took ``ms``."""
        if self.backoff is not None:
            self.backoff.observe(batch_size, n, ms, tokens_per_seq, route)
