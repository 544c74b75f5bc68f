"""Back-off: how much to speculate this step, from how many sequences are decoding.

A verify step over B sequences with an n-candidate tree costs lat(B, n) (measured on the device
at start-up; n = 0 is a plain decode step) and yields B * E[n] tokens, where E[n] is the tree's
expected accepted length from the heads' measured accuracies (E[0] = 1). Each step takes the n
with the most expected tokens per second. At small B the step cost barely grows with n and a
big tree wins; as B grows the step becomes compute-bound, the tree's extra tokens cost real
time, and the policy shrinks the tree, down to plain decoding — so throughput follows the
better of the two instead of falling below plain decoding. Served steps correct the model
(observed step time per tree size, observed tokens per step), so a start-up measurement that
noise made optimistic is unlearned within a few dozen steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyPoint:
    batch_size: int
    num_candidates: int  # 0: plain decoding
    ms: float


class LatencyModel:
    """Step latency, measured on a grid of batch sizes × tree sizes, interpolated linearly in
    log(batch size) between measured batch sizes (and extrapolated linearly in B beyond)."""

    def __init__(self, points: list[LatencyPoint]) -> None:
        self.table: dict[int, dict[int, float]] = {}
        for p in sorted(points, key=lambda p: (p.num_candidates, p.batch_size)):
            self.table.setdefault(p.num_candidates, {})[p.batch_size] = p.ms
        if 0 not in self.table:
            raise ValueError("latency model: plain decoding (num_candidates=0) was not measured")
        # A step with more sequences or a bigger tree does more work and cannot be faster:
        # measured inversions are timing noise (a busy CPU), so lift them to the running max.
        prev: dict[int, float] = {}
        for n in sorted(self.table):
            row, floor = self.table[n], 0.0
            for b in sorted(row):
                floor = max(floor, row[b], prev.get(b, 0.0))
                row[b] = floor
            prev = row

        # Per (tree size, decision path), observed / measured step time (EMA over served
        # steps): start-up timings are a few samples on a possibly busy machine at one context
        # length, of greedy steps only. The path (engine/sampling.py ``decision_path``) is how
        # the step decides: the captured greedy tail, the captured sampled tail (probabilities
        # over the tree rows its rules read), or the host (logprobs, penalties: several times the greedy
        # step — H100, batch 16, T=0.7, typical on the host: 13.8 ms against 2.7 ms) — each a
        # cost of its own.
        self.correction: dict[tuple[int, str], float] = {(n, "greedy"): 1.0 for n in self.table}
        self._surprises: dict[tuple[int, str], int] = {}

    @property
    def sizes(self) -> list[int]:
        return sorted(self.table)

    # A served step this far off the prediction is a surprise: maybe a one-off stall (a CUDA
    # graph captured on first use, allocator growth, a GC pause), not the step's cost — learning
    # from one would price a tree size out for good, since back-off then never runs it again to
    # unlearn. PERSISTENT surprises running are the step's real cost, and are taken at once (an
    # EMA would pay for dozens of slow steps first: a step decided on the host costs 2.5–5x the
    # greedy step the grid measured). Closer observations pull the estimate by the EMA.
    SURPRISE_RATIO = 1.5
    PERSISTENT = 3
    # A tree size priced out is never served again, so never unlearned: a stall longer than
    # PERSISTENT steps, or a load that has since changed, would keep it out for good. Every
    # served step on a path pulls the other sizes' raised corrections back toward that path's
    # prior by this fraction (half-way in ~350 steps): a size that really is slow costs
    # PERSISTENT slow steps now and then to be priced out again.
    FORGET = 0.002

    def _correction(self, n: int, path: str) -> float:
        if (n, path) in self.correction:
            return self.correction[n, path]
        if n == 0:  # plain decoding's prior: as measured, so back-off falls back to it readily
            return 1.0
        # A tree size not served on this (non-greedy) path yet: what the served ones learned so
        # far, else what plain decoding's steps on it did (deciding a tree there costs no less
        # than sampling one token there: without this prior back-off pays a few slow steps per
        # size to learn it, measured at batch 64, T=0.7 on the host).
        known = [c for (m, h), c in self.correction.items() if h == path and m > 0]
        return sum(known) / len(known) if known else self.correction.get((0, path), 1.0)

    def observe(self, batch_size: int, n: int, ms: float, weight: float = 0.1, path: str = "greedy") -> None:
        if weight <= 0:  # learning off
            return
        key, measured = (n, path), self._measured(batch_size, n)
        self._forget(n, path)
        corr = self._correction(n, path)
        if not 1 / self.SURPRISE_RATIO <= ms / (measured * corr) <= self.SURPRISE_RATIO:
            self._surprises[key] = self._surprises.get(key, 0) + 1
            if self._surprises[key] >= self.PERSISTENT:
                self.correction[key] = ms / measured
                self._surprises[key] = 0
            return
        self._surprises[key] = 0
        self.correction[key] = corr + weight * (ms / measured - corr)

    def _forget(self, served: int, path: str) -> None:
        prior = 1.0 if path == "greedy" else self.correction.get((0, path), 1.0)
        for (m, h), c in self.correction.items():
            if h == path and m not in (0, served) and c > prior:
                self.correction[m, h] = c - self.FORGET * (c - prior)

    def ms(self, batch_size: int, n: int, path: str = "greedy") -> float:
        return self._measured(batch_size, n) * self._correction(n, path)

    def _measured(self, batch_size: int, n: int) -> float:
        row = self.table[n]
        bs = sorted(row)
        if batch_size in row:
            return row[batch_size]
        i = bisect.bisect_left(bs, batch_size)
        if i == 0:
            return row[bs[0]]
        if i == len(bs):  # beyond the grid: per-sequence cost of the last interval
            if len(bs) == 1:
                return row[bs[-1]] * batch_size / bs[-1]
            lo, hi = bs[-2], bs[-1]
            return row[hi] + (row[hi] - row[lo]) / (hi - lo) * (batch_size - hi)
        lo, hi = bs[i - 1], bs[i]
        w = (math.log(batch_size) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return row[lo] * (1 - w) + row[hi] * w


class BackoffPolicy:
    def __init__(self, latency: LatencyModel, expected: dict[int, float], margin: float = 1.1,
                 learning_rate: float = 0.1) -> None:
        """expected[n]: expected tokens per step with the n-candidate tree (n = 0 → 1.0), the
        start-up prior of every decision path. The sizes are nested trees (``nested_subtrees``:
        each holds every smaller one's nodes). A tree must promise ``margin`` times plain
        decoding's rate to be used: the expected lengths assume independent heads and the
        timings are noisy, and being wrong costs more than the last few percent of a marginal
        gain."""
        self.latency, self.margin, self.learning_rate = latency, margin, learning_rate
        self.prior = {0: 1.0, **expected}
        missing = [n for n in latency.sizes if n not in self.prior]
        if missing:
            raise ValueError(f"back-off: no expected accepted length for tree sizes {missing}")
        # Tokens per step learned from served steps, per decision path (engine/sampling.py
        # ``decision_path``), each starting from the prior: greedy and sampled steps accept
        # differently (H100, bundled heads, batch 1: typical acceptance at T=0.7 took 4.96
        # tokens a step on the 32-candidate tree, greedy 2.6).
        self.expected: dict[str, dict[int, float]] = {}

    def expected_on(self, path: str) -> dict[int, float]:
        """Expected tokens per step by tree size for steps deciding by ``path``."""
        if path not in self.expected:
            self.expected[path] = dict(self.prior)
        return self.expected[path]

    def observe(self, batch_size: int, n: int, ms: float, tokens_per_seq: float, path: str = "greedy") -> None:
        """A served step of ``batch_size`` decoding sequences with n-candidate trees took ``ms``
        and produced ``tokens_per_seq`` tokens per sequence (``path``: how it decided, ``decision_path``):
        pull the model toward it."""
        self.latency.observe(batch_size, n, ms, self.learning_rate, path)
        if not n:
            return
        expected = self.expected_on(path)
        expected[n] += self.learning_rate * (tokens_per_seq - expected[n])
        # The trees are nested: a tree holds every smaller one's nodes, so it accepts at least
        # as many tokens a step. A smaller tree's estimate is capped at this one's; a bigger
        # tree's is lifted to at least this one's, scaled as their priors are (optimistic on
        # purpose: the bigger tree then gets served and learns its own value). Without this a
        # few unlucky steps on the full tree priced it below an unserved smaller tree's prior;
        # that tree then learned a high value the full tree, never served again, could not
        # match (H100, batch 1, T=0.7: the 4-candidate tree in 312 of 316 steps, 1.68x plain
        # decoding where the full tree alone made 2.47x).
        for m in expected:
            if m > n:
                expected[m] = max(expected[m], expected[n] * self.prior[m] / self.prior[n])
            elif 0 < m < n:
                expected[m] = min(expected[m], expected[n])

    def rate(self, batch_size: int, n: int, path: str = "greedy") -> float:
        """Expected tokens per second with B sequences and an n-candidate tree."""
        return batch_size * self.expected_on(path)[n] / self.latency.ms(batch_size, n, path) * 1e3

    def choose(self, batch_size: int, max_candidates: int, path: str = "greedy") -> int:
        """The number of candidates per sequence for a step decoding ``batch_size`` sequences
        (at most ``max_candidates``, e.g. what the token budget allows; ``path``: how the step
        will decide — greedy or sampled tail, or the host)."""
        if batch_size <= 0:
            return 0
        options = [n for n in self.latency.sizes if 0 < n <= max_candidates]
        if not options:
            return 0
        best = max(options, key=lambda n: (self.rate(batch_size, n, path), -n))
        return best if self.rate(batch_size, best, path) >= self.margin * self.rate(batch_size, 0, path) else 0
