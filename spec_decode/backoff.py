"""Back-off: how much to speculate this step, from how many sequences are decoding.

A verify step over B sequences with an n-candidate tree costs lat(B, n) (measured on the device
at start-up; n = 0 is a plain decode step) and yields B * E[n] tokens, where E[n] is the tree's
expected accepted length from the heads' measured accuracies (E[0] = 1). Each step takes the n
with the most expected tokens per second. At small B the step cost barely grows with n and a
big tree wins; as B grows the step becomes compute-bound, the tree's extra tokens cost real
time, and the policy shrinks the tree, down to plain decoding — so throughput follows the
better of the two instead of falling below plain decoding.
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
        for p in points:
            self.table.setdefault(p.num_candidates, {})[p.batch_size] = p.ms
        if 0 not in self.table:
            raise ValueError("latency model: plain decoding (num_candidates=0) was not measured")

    @property
    def sizes(self) -> list[int]:
        return sorted(self.table)

    def ms(self, batch_size: int, n: int) -> float:
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
    def __init__(self, latency: LatencyModel, expected: dict[int, float]) -> None:
        """expected[n]: expected tokens per step with the n-candidate tree (n = 0 → 1.0)."""
        self.latency = latency
        self.expected = {0: 1.0, **expected}
        missing = [n for n in latency.sizes if n not in self.expected]
        if missing:
            raise ValueError(f"back-off: no expected accepted length for tree sizes {missing}")

    def rate(self, batch_size: int, n: int) -> float:
        """Expected tokens per second with B sequences and an n-candidate tree."""
        return batch_size * self.expected[n] / self.latency.ms(batch_size, n) * 1e3

    def choose(self, batch_size: int, max_candidates: int) -> int:
        """The number of candidates per sequence for a step decoding ``batch_size`` sequences
        (at most ``max_candidates``, e.g. what the token budget allows)."""
        if batch_size <= 0:
            return 0
        options = [n for n in self.latency.sizes if n <= max_candidates]
        return max(options, key=lambda n: (self.rate(batch_size, n), -n))
