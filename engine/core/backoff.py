"""Back-off: how much to speculate this step, from how many sequences are decoding.

A verify step over B sequences with an n-candidate tree costs lat(B, n) (measured on the device
at start-up; n = 0 is a plain decode step) and yields B * E[n] tokens, where E[n] is the tree's
expected accepted length from the heads' measured accuracies (E[0] = 1). Each step takes the n
with the most expected tokens per second. At small B the step cost barely grows with n and a
big tree wins; as B grows the step becomes compute-bound, the tree's extra tokens cost real
time, and the policy shrinks the tree, down to plain decoding — so throughput follows the
better of the two instead of falling below plain decoding. Served steps correct the model:
observed step time per tree size (``LatencyModel``), so a start-up measurement that noise
made optimistic is unlearned within a few dozen steps, and observed tokens per step
(``AcceptanceCalibration``), so heads that do worse on today's traffic than on their own
held-out prompts — or accept nothing at all — are trusted less within a few steps, at every
batch size.

What served steps teach is kept per batch bucket (the power of two at or above the number of
decoding sequences), because neither correction carries across loads:
- a step's host work (scheduling, applying tokens, outputs) grows with its sequences and
  candidates, which the start-up grid (the device's work) leaves out: H100, bundled model,
  batch 64, a 4-candidate step took 3.75 ms against the grid's 2.07 (1.81x), a plain one 1.85
  against 1.34 (1.38x), while at batch 1-16 both ran within 10% of the grid;
- the sequences still decoding when a batch thins out are the ones whose trees accept least
  (they are the ones left): pooled with the full batch's steps they taught back-off 1.66
  tokens a step for every tree size at batch 64.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional


def batch_bucket(batch_size: int) -> int:
    """The bucket whose served steps teach back-off about steps of ``batch_size`` sequences: the
    power of two at or above it."""
    return 1 << max(0, batch_size - 1).bit_length()


def _nearest(known: dict[int, float], bucket: int):
    """The value of the bucket nearest ``bucket`` (in doublings; the larger one on a tie), or
    None when ``known`` is empty."""
    if not known:
        return None
    return known[min(known, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))]


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
        self._batches = {n: sorted(row) for n, row in self.table.items()}
        self._grid_cache: dict[tuple[int, int], float] = {}  # (batch size, n) → interpolated ms

        # Per (tree size, decision route, batch bucket), observed / measured step time (EMA over
        # served steps): start-up timings are a few samples on a possibly busy machine at one
        # context length, of the device's work on greedy steps only. The route
        # (engine/sample/sampler.py ``decision_route``) is how the step decides: the captured greedy
        # tail, the captured sampled tail (probabilities over the tree rows its rules read), or
        # the host (logprobs, penalties: several times the greedy step — H100, batch 16, T=0.7,
        # typical on the host: 13.8 ms against 2.7 ms) — each a cost of its own. The bucket
        # (``batch_bucket``): the host's share of a step grows with its sequences (module doc).
        self.correction: dict[tuple[int, str, int], float] = {}
        self._surprises: dict[tuple[int, str, int], int] = {}
        # The same corrections indexed for the lookups every step makes (choose() prices each
        # size, learned or not): (size, route) → {bucket: c} and (route, bucket) → {size: c}.
        self._by_size: dict[tuple[int, str], dict[int, float]] = {}
        self._by_bucket: dict[tuple[str, int], dict[int, float]] = {}

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
    # served step on a route pulls the other sizes' raised corrections back toward that route's
    # prior by this fraction (half-way in ~350 steps): a size that really is slow costs
    # PERSISTENT slow steps now and then to be priced out again.
    FORGET = 0.002

    def _set(self, n: int, route: str, bucket: int, c: float) -> None:
        self.correction[n, route, bucket] = c
        self._by_size.setdefault((n, route), {})[bucket] = c
        self._by_bucket.setdefault((route, bucket), {})[n] = c

    def _correction(self, n: int, route: str, bucket: int) -> float:
        c = self.correction.get((n, route, bucket))
        if c is not None:
            return c
        # Not served at this load yet: what this size learned at the nearest load (a step's
        # host share changes gradually with its sequences).
        near = _nearest(self._by_size.get((n, route), {}), bucket)
        if near is not None:
            return near
        if n == 0:  # plain decoding's prior: as measured, so back-off falls back to it readily
            return 1.0 if route == "greedy" else self._correction(0, "greedy", bucket)
        # A tree size not served on this route yet: what the served sizes learned here, else
        # what plain decoding's steps did (deciding a tree costs no less than sampling one
        # token: without this prior back-off pays a few slow steps per size to learn it,
        # measured at batch 64, T=0.7 on the host), else the grid as measured.
        known = [c for m, c in self._by_bucket.get((route, bucket), {}).items() if m > 0]
        if known:
            return sum(known) / len(known)
        plain = _nearest(self._by_size.get((0, route), {}), bucket)
        return plain if plain is not None else 1.0

    def observe(self, batch_size: int, n: int, ms: float, weight: float = 0.1, route: str = "greedy") -> None:
        if weight <= 0:  # learning off
            return
        bucket = batch_bucket(batch_size)
        key, measured = (n, route, bucket), self._measured(batch_size, n)
        self._forget(n, route, bucket)
        corr = self._correction(n, route, bucket)
        if not 1 / self.SURPRISE_RATIO <= ms / (measured * corr) <= self.SURPRISE_RATIO:
            self._surprises[key] = self._surprises.get(key, 0) + 1
            if self._surprises[key] >= self.PERSISTENT:
                self._set(*key, ms / measured)
                self._surprises[key] = 0
            return
        self._surprises[key] = 0
        self._set(*key, corr + weight * (ms / measured - corr))

    def _forget(self, served: int, route: str, bucket: int) -> None:
        prior = self._correction(0, route, bucket)
        for m, c in list(self._by_bucket.get((route, bucket), {}).items()):
            if m not in (0, served) and c > prior:
                self._set(m, route, bucket, c - self.FORGET * (c - prior))

    def ms(self, batch_size: int, n: int, route: str = "greedy") -> float:
        return self._measured(batch_size, n) * self._correction(n, route, batch_bucket(batch_size))

    def _measured(self, batch_size: int, n: int) -> float:
        ms = self._grid_cache.get((batch_size, n))
        if ms is None:
            ms = self._grid_cache[batch_size, n] = self._interpolate(batch_size, n)
        return ms

    def _interpolate(self, batch_size: int, n: int) -> float:
        row = self.table[n]
        bs = self._batches[n]
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


class AcceptanceCalibration:
    """How much of the gain the heads promise served steps deliver: a scale on the expected
    extra tokens per step, learned per (decision route, batch bucket) and pooled per route.

    The heads' measured accuracy (tree.json, from their held-out prompts) promises each tree
    ``prior[n] - 1`` tokens a step beyond plain decoding's one. Traffic unlike the heads'
    training data delivers less (issue 29: 2.36 tokens a step on public chat prompts against
    the 3.18 the heads' held-out split promised; random heads deliver nothing). A step that
    delivered ``d`` extra tokens a sequence where ``p`` were promised adds (d, p) to its
    bucket's sums and to its route's pooled sums; the scale is delivered over promised, with
    the heads' own word (scale 1) counted as ``PRIOR_WEIGHT`` promised tokens in the pooled
    figure and the pooled figure as ``BUCKET_WEIGHT`` promised tokens in a bucket's. So one
    calibration serves every tree size (they are nested: what the heads get wrong at depth d
    they get wrong in every tree that reaches it), a few steps anywhere move every bucket, and
    a bucket with steps of its own follows them (the few sequences left at the end of a batch
    accept less than the whole batch did: H100, batch 64, pooled they taught back-off 1.66
    tokens a step for every tree size).

    Every observed step ages its bucket's sums and its route's: a tree step by ``BUCKET_DECAY``
    and ``POOLED_DECAY`` (recent steps count most: half-way in ~23 and ~70 tree steps), a plain
    step by the slower ``PLAIN_*`` factors. A bucket that went plain learns nothing new of its
    trees, so what made it go plain fades slowly (half-way in ~140 plain steps there, ~350
    pooled) and the trees are tried again for a few steps: with heads that deliver nothing,
    plain from the 3rd to 8th step on and the tries cost under 3% of a plain run at batch 1 to
    128 (tests/test_backoff.py, a latency grid shaped like the bundled model's on an H100);
    heads with an unlucky start (three steps accepting nothing at batch 1) keep speculating.
    """

    PRIOR_WEIGHT = 4.0
    BUCKET_WEIGHT = 8.0
    BUCKET_DECAY = 0.97
    POOLED_DECAY = 0.99
    PLAIN_BUCKET_DECAY = 0.995
    PLAIN_POOLED_DECAY = 0.998
    MAX_SEQUENCES = 8

    def __init__(self) -> None:
        self._bucket: dict[tuple[str, int], list[float]] = {}  # (route, bucket) → [delivered, promised]
        self._pooled: dict[str, list[float]] = {}  # route → [delivered, promised]

    def observe(self, route: str, bucket: int, promised: float, delivered: float, sequences: int = 1) -> None:
        """A served step of ``sequences`` sequences in ``bucket`` on ``route``: ``promised`` extra
        tokens a sequence by the heads' accuracy (0 for a plain step, which only ages the
        evidence), ``delivered`` as many as it made (tokens a sequence - 1). Each sequence is
        evidence (up to ``MAX_SEQUENCES`` a step: a batch's prompts are alike more often than
        not), so a batch of 8 that accepts nothing teaches as much as 8 steps of one sequence,
        and one sequence's unlucky start teaches little."""
        tree = promised > 0
        w = min(max(1, sequences), self.MAX_SEQUENCES)
        for sums, decay in ((self._bucket.setdefault((route, bucket), [0.0, 0.0]),
                             self.BUCKET_DECAY if tree else self.PLAIN_BUCKET_DECAY),
                            (self._pooled.setdefault(route, [0.0, 0.0]),
                             self.POOLED_DECAY if tree else self.PLAIN_POOLED_DECAY)):
            sums[0] = sums[0] * decay + (w * max(0.0, delivered) if tree else 0.0)
            sums[1] = sums[1] * decay + w * promised

    def pooled(self, route: str) -> float:
        delivered, promised = self._pooled.get(route, (0.0, 0.0))
        return (delivered + self.PRIOR_WEIGHT) / (promised + self.PRIOR_WEIGHT)

    def learned(self) -> dict[tuple[str, int], float]:
        """The scale of every (route, batch bucket) served so far."""
        return {key: self.scale(*key) for key in self._bucket}

    def scale(self, route: str, bucket: int) -> float:
        """Delivered over promised extra tokens for steps of ``bucket`` on ``route``."""
        delivered, promised = self._bucket.get((route, bucket), (0.0, 0.0))
        return (delivered + self.BUCKET_WEIGHT * self.pooled(route)) / (promised + self.BUCKET_WEIGHT)


class BackoffPolicy:
    def __init__(self, latency: LatencyModel, expected: dict[int, float], margin: float = 1.1,
                 learning_rate: float = 0.1) -> None:
        """expected[n]: expected tokens per step with the n-candidate tree (n = 0 → 1.0) by the
        heads' measured accuracy — the prior, corrected by served steps through
        ``AcceptanceCalibration``. The sizes are nested trees (``nested_subtrees``: each holds
        every smaller one's nodes). A tree must promise ``margin`` times plain decoding's rate to
        be used: the expected lengths assume independent heads and the timings are noisy, and
        being wrong costs more than the last few percent of a marginal gain. ``learning_rate``:
        the latency model's (0: served steps teach nothing, neither latency nor acceptance)."""
        self.latency, self.margin, self.learning_rate = latency, margin, learning_rate
        self.prior = {0: 1.0, **expected}
        missing = [n for n in latency.sizes if n not in self.prior]
        if missing:
            raise ValueError(f"back-off: no expected accepted length for tree sizes {missing}")
        # Greedy and sampled steps accept differently (H100, bundled heads, batch 1: typical
        # acceptance at T=0.7 took 4.96 tokens a step on the 32-candidate tree, greedy 2.6):
        # the calibration is kept per decision route.
        self.calibration = AcceptanceCalibration()
        self._last_choice: Optional[tuple[tuple, int]] = None  # (arguments, answer) of the last choose

    def expected_on(self, route: str, batch_size: int) -> dict[int, float]:
        """Expected tokens per step by tree size for steps of ``batch_size`` sequences deciding
        by ``route`` (engine/sample/sampler.py ``decision_route``)."""
        scale = self.calibration.scale(route, batch_bucket(batch_size))
        return {n: 1.0 + scale * (e - 1.0) for n, e in self.prior.items()}

    def observe(self, batch_size: int, n: int, ms: float, tokens_per_seq: float, route: str = "greedy") -> None:
        """A served step of ``batch_size`` decoding sequences with n-candidate trees took ``ms``
        and produced ``tokens_per_seq`` tokens per sequence (``route``: how it decided, ``decision_route``):
        pull the model toward it."""
        if self.learning_rate <= 0:  # learning off
            return
        self._last_choice = None
        self.latency.observe(batch_size, n, ms, self.learning_rate, route)
        self.calibration.observe(route, batch_bucket(batch_size), self.prior[n] - 1.0, tokens_per_seq - 1.0,
                                 batch_size)

    def rate(self, batch_size: int, n: int, route: str = "greedy") -> float:
        """Expected tokens per second with B sequences and an n-candidate tree."""
        return batch_size * self.expected_on(route, batch_size)[n] / self.latency.ms(batch_size, n, route) * 1e3

    def choose(self, batch_size: int, max_candidates: int, route: str = "greedy") -> int:
        """The number of candidates per sequence for a step decoding ``batch_size`` sequences
        (at most ``max_candidates``, e.g. what the token budget allows; ``route``: how the step
        will decide — greedy or sampled tail, or the host)."""
        if batch_size <= 0:
            return 0
        # The scheduler asks twice a step (this step's tree, and whether to propose for the
        # next), in a pure decode step with the same arguments; only observe() changes the
        # answer, and it forgets the remembered one.
        key = (batch_size, max_candidates, route, self.margin)
        if self._last_choice is not None and self._last_choice[0] == key:
            return self._last_choice[1]
        expected = self.expected_on(route, batch_size)
        ms = {n: self.latency.ms(batch_size, n, route) for n in self.latency.sizes if n <= max_candidates}
        rate = {n: expected[n] / t for n, t in ms.items()}
        options = [n for n in rate if n > 0]
        best = max(options, key=lambda n: (rate[n], -n)) if options else 0
        if best and rate[best] < self.margin * rate[0]:
            best = 0
        self._last_choice = (key, best)
        return best
