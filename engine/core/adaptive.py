"""Adaptive trees: each decoding sequence's tree sized by its own heads' confidence, under one
budget of verify tokens per step (``speculative.adaptive``).

Back-off (engine/core/backoff.py) picks one tree size per step for every sequence. Here every
sequence verifies its own part of the full tree:

1. **Value of a node.** The proposal reports, per candidate, its head's probability of it given
   its parent (``SeqResult.next_confidence``). ``NodeCalibration`` maps that probability, per
   tree depth, to the chance that served steps accepted such a node when its parent was
   accepted. A node's value is the product of those chances along its path: the estimated
   probability that the whole path is accepted — each factor is at most 1, so a child is never
   worth more than its parent.
2. **Best-first across sequences.** All (sequence, node) pairs are ranked by value (the
   shallower node first on a tie, so the taken set is closed under parents): the first M of
   them are the step's verified nodes. A sequence whose heads are unsure gets few nodes or
   none, a sure one a deep tree. The expected tokens of the step are B + the sum of the M
   values (each node adds the chance it is on the accepted path; siblings guess distinct
   tokens, so at most one per depth is).
3. **The budget.** M is the count with the most expected tokens per millisecond, pricing a
   step of B sequences and M nodes from the start-up latency grid (``LatencyModel``:
   batch sizes × uniform tree sizes, corrected by served steps) at M/B nodes a sequence,
   interpolated between measured tree sizes, plus what the nodes cost the driver itself
   (planning them, learning from them: ``measure_driver_ms_per_node``, timed at start-up on
   this host — Python work per node that the grid, the workers' time, leaves out). A step of
   trees must promise ``margin`` times plain decoding's rate, or the step is plain.
4. **Calibration learned online.** After each step every verified node whose parent was
   accepted is a trial: accepted or not (``observe_step``). Evidence decays, so a shift in
   traffic is followed within a few dozen steps, and the heads' own word is the prior — heads
   that promise much and deliver nothing are priced out within a few steps.
5. **Proposals.** When the last step chose no node, the heads still propose now and then,
   ever more rarely and priced (``propose_next``: their confidence is what could bring trees
   back), so heads that are never trusted cost ~2% of a plain run.

The policy runs on the driver in pure Python (the core needs no torch or numpy). Its plan walks
every sequence's tree best-first from one heap, valuing a node only once its parent is taken,
and stops as soon as no larger budget can win: per step the root's children of every sequence
plus the children of the nodes taken, not B·C values for B sequences and C candidates (what it
saves: docs/performance.md). The node counts it weighs are what the ragged steps' CUDA graphs
of the batch bucket hold (engine/core/shapes.py ``ragged_tokens``), so a step fills its graph. On a GPU a step of greedy sequences that
verifies adaptive trees or proposes replays such a graph and decides on the device (the
"greedy" route); a step with sampled sequences (or without graphs) decides on the host path
(``ROUTE``); each is priced on its route. A plain step that does not propose takes the
uniform graphs and device tail like any engine's.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from dataclasses import dataclass
from typing import Sequence

from engine.core.backoff import LatencyModel, LatencyPoint
from engine.core.shapes import RAGGED_NODES_PER_SEQ, padded_batch, ragged_tokens

# The route of a step of adaptive trees that a ragged step's graph cannot decide (sampled
# sequences, logprobs, grammars, no graphs): the host path, whose latency corrections are
# learned apart from the greedy route's (engine/core/backoff.py ``LatencyModel``).
ROUTE = "host"

# Bins of the heads' probability a calibration keeps apart (a head that says 0.9 is usually
# right more often than one that says 0.3, but by how much depends on the traffic).
PROB_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)


def _bin(p: float) -> int:
    return bisect.bisect_right(PROB_EDGES, p)


class NodeCalibration:
    """Head probability → P(node accepted | its parent accepted), per tree depth and
    probability bin: what served steps delivered over what the heads promised there.

    Evidence is pooled in three levels, each the prior of the next: all depths together (the
    heads' own word, ratio 1, counts as ``GLOBAL_PRIOR`` promised tokens), each depth (the
    global ratio as ``DEPTH_PRIOR`` promised tokens), each (depth, bin) (its depth's ratio as
    ``BIN_PRIOR`` trials at the bin's mean promise). So heads that promise much and deliver
    nothing are priced out everywhere within a few steps — also at depths and confidences
    never verified yet — while well-calibrated heads keep their word, and a bin with evidence
    of its own follows it. The evidence decays by ``DECAY`` every observed step and by
    ``IDLE_DECAY`` every step that verified nothing, so heads priced out are tried again now
    and then (in tests/test_adaptive.py's setting: priced out after 2 steps, tried again
    after ~90 plain ones)."""

    GLOBAL_PRIOR = 8.0
    DEPTH_PRIOR = 4.0
    BIN_PRIOR = 4.0
    DECAY = 0.98
    IDLE_DECAY = 0.995
    MAX_VALUE = 0.999  # a node is never certain: the product along a path must shrink

    def __init__(self, depth: int) -> None:
        nb = len(PROB_EDGES) + 1
        # Per depth and bin: [trials, accepted, the heads' summed probability over the trials].
        self.sums = [[[0.0, 0.0, 0.0] for _ in range(nb)] for _ in range(depth)]
        self._ratio: list[list[float]] = [[1.0] * nb for _ in range(depth)]

    def value(self, depth: int, p: float) -> float:
        """Calibrated P(accepted | parent accepted) of a depth-``depth`` node (1-based) whose
        head said ``p``."""
        return min(self.MAX_VALUE, p * self._ratio[depth - 1][_bin(p)])

    def observe(self, trials: Sequence[tuple[int, float, bool]]) -> None:
        """One step's trials: (depth, head probability, accepted)."""
        self._age(self.DECAY)
        for depth, p, ok in trials:
            s = self.sums[depth - 1][_bin(p)]
            s[0] += 1.0
            s[1] += float(ok)
            s[2] += p
        self._refresh()

    def idle(self) -> None:
        self._age(self.IDLE_DECAY)
        self._refresh()

    def _age(self, f: float) -> None:
        for row in self.sums:
            for s in row:
                s[0] *= f
                s[1] *= f
                s[2] *= f

    def _refresh(self) -> None:
        acc_all = sum(s[1] for row in self.sums for s in row)
        prom_all = sum(s[2] for row in self.sums for s in row)
        pooled = (acc_all + self.GLOBAL_PRIOR) / (prom_all + self.GLOBAL_PRIOR)
        for d, row in enumerate(self.sums):
            acc_d, prom_d = sum(s[1] for s in row), sum(s[2] for s in row)
            depth = (acc_d + self.DEPTH_PRIOR * pooled) / (prom_d + self.DEPTH_PRIOR)
            for b, (n, acc, prom) in enumerate(row):
                if n < 1e-9:
                    self._ratio[d][b] = depth
                    continue
                w = self.BIN_PRIOR * prom / n  # BIN_PRIOR trials at the bin's mean promise
                self._ratio[d][b] = (acc + w * depth) / (prom + w)


@dataclass(frozen=True)
class Candidates:
    """What a decoding sequence offers a step: the full tree's candidate tokens and, per
    candidate, its head's probability given its parent."""
    seq_id: int
    tokens: Sequence[int]
    confidence: Sequence[float]


class AdaptivePlan(dict):
    """seq_id → the candidates (indices among the full tree's, ascending) it verifies; only
    sequences with at least one. ``expected``: the step's expected tokens beyond one a
    sequence."""
    expected: float = 0.0


class AdaptiveTrees:
    """The adaptive tree policy's state: calibration, latency model, proposal probes."""

    MIN_VALUE = 1e-3  # a node less likely than this to be accepted is never verified
    PROBE_FIRST = 4
    PROBE_MAX = 512
    PROBE_BUDGET = 0.02  # the share of a plain run the probes may cost

    def __init__(self, parents: Sequence[int], depths: Sequence[int], latency: LatencyModel,
                 margin: float = 1.1, learning_rate: float = 0.1, driver_ms_per_node: float = 0.0) -> None:
        """``parents`` / ``depths``: the full tree's (``MedusaTree.parents`` / ``depths``, node 0
        the root, candidate i is node i + 1). ``margin``: how much more than plain decoding's
        rate a step of trees must promise; ``learning_rate``: how fast served steps correct the
        latency model (the calibration always learns); ``driver_ms_per_node``: what each
        verified node costs the driver itself (planning it, learning from it:
        ``measure_driver_ms_per_node``), which the latency grid — the workers' time — leaves out."""
        self.parents = [p - 1 for p in parents[1:]]  # candidate index of each candidate's parent (-1: root)
        self.depths = list(depths[1:])
        self.children: list[list[int]] = [[] for _ in range(len(self.depths) + 1)]  # by node id
        for c, p in enumerate(self.parents):
            self.children[p + 1].append(c)
        self.latency, self.margin, self.learning_rate = latency, margin, learning_rate
        self.driver_ms_per_node = driver_ms_per_node
        self.calibration = NodeCalibration(max(self.depths))
        self._hair = [1e-9 * d for d in self.depths]  # (plan's tie-break)
        self._plain_streak = 0  # steps in a row that verified no node
        self._since_proposal = 0
        self._probe_every = 0  # steps between probes (0: not set since trees were last chosen)

    # ---- one step's plan ---------------------------------------------------------------
    def values(self, confidence: Sequence[float]) -> list[float]:
        """Each candidate's estimated probability that its whole path is accepted."""
        v = [0.0] * len(self.depths)
        ratio, edges, top = self.calibration._ratio, PROB_EDGES, NodeCalibration.MAX_VALUE
        for c, (p, d, parent) in enumerate(zip(confidence, self.depths, self.parents)):
            # (NodeCalibration.value, inlined: this loop runs B x C times a step)
            x = p * ratio[d - 1][bisect.bisect_right(edges, p)]
            v[c] = (x if x < top else top) * (v[parent] if parent >= 0 else 1.0)
        return v

    def budgets(self, num_decoding: int, max_nodes: int) -> list[int]:
        """The node counts a step of ``num_decoding`` sequences may verify: what the ragged-step
        graphs of its batch bucket hold beyond its pending tokens (engine/core/shapes.py
        ``ragged_tokens``), at most ``max_nodes``; past the largest bucket, the same shares of
        the batch."""
        b, n = num_decoding, len(self.depths) + 1
        bucket = padded_batch(b)
        counts = (ragged_tokens(bucket, n, b + max_nodes) if bucket is not None else
                  [b + math.ceil(b * x) for x in RAGGED_NODES_PER_SEQ])
        return sorted({min(t - b, max_nodes) for t in counts if t > b})

    def plan(self, seqs: Sequence[Candidates], num_decoding: int, max_nodes: int, route: str = ROUTE) -> AdaptivePlan:
        """The step's trees: ``seqs`` the decoding sequences holding candidates, ``num_decoding``
        all decoding sequences (those without candidates decode plainly), ``max_nodes`` what
        the token budget leaves for tree nodes, ``route`` how the step decides (its price).
        The choice is ``select``'s; the policy then counts the steps that chose none."""
        return self._chose(self.select(seqs, num_decoding, max_nodes, route))

    def select(self, seqs: Sequence[Candidates], num_decoding: int, max_nodes: int, route: str = ROUTE
               ) -> AdaptivePlan:
        """``plan``'s choice, changing nothing.

        Best-first over every sequence's tree at once: a heap holds the nodes whose parent is
        taken, so nodes come out in the order of their values (a child is worth less than its
        parent), and a node's value is computed only once its parent is taken — not the
        B x C values of every candidate (at batch 64 and the 63-candidate tree, 4,032 values
        a step in Python). The walk stops at the largest budget,
        or as soon as no larger budget can beat the best rate found, even if every node still
        to come were worth as much as the best of them."""
        plan = AdaptivePlan()
        c = len(self.depths)
        mine = [s for s in seqs if len(s.confidence) == c]
        b = num_decoding
        if not mine or b <= 0 or max_nodes <= 0:
            return plan
        budgets = self.budgets(b, max_nodes)
        if not budgets:
            return plan
        costs = [self.step_ms(b, m, route) for m in budgets]
        best_m, best_rate = 0, b / self.latency.ms(b, 0, route) * self.margin
        edges, top, floor = PROB_EDGES, NodeCalibration.MAX_VALUE, self.MIN_VALUE
        # Each candidate's calibration row (its depth's ratios by bin), looked up once a step.
        rows = [self.calibration._ratio[d - 1] for d in self.depths]
        children, hair, bisect_right = self.children, self._hair, bisect.bisect_right
        pop, push = heapq.heappop, heapq.heappush
        # Heap entries: (-(value - a hair per depth), flat index i * C + k, value). The hair makes
        # a tie go to the shallower node, the flat index to the earlier sequence and candidate.
        heap: list[tuple[float, int, float]] = []

        def expand(i: int, node: int, parent_value: float) -> None:
            """Node ``node`` (0: the root) of sequence i is taken: its children join the heap, each
            valued as ``values`` does — its calibrated confidence times its parent's value."""
            conf, base = mine[i].confidence, i * c
            for k in children[node]:
                p = conf[k]
                x = p * rows[k][bisect_right(edges, p)]
                v = (x if x < top else top) * parent_value
                key = hair[k] - v
                if -key >= floor:
                    push(heap, (key, base + k, v))

        for i in range(len(mine)):
            expand(i, 0, 1.0)
        taken: list[int] = []
        gain, nxt = 0.0, 0  # the taken values' sum; the next budget to price
        goal = budgets[0]
        while True:
            if heap and len(taken) < goal:
                _, j, pv = pop(heap)
                taken.append(j)
                gain += pv
                expand(j // c, j % c + 1, pv)
                continue
            # At a budget (or out of nodes: the budget shrinks to what there is).
            m = len(taken)
            rate = (b + gain) / (costs[nxt] if m == goal else self.step_ms(b, m, route))
            if rate > best_rate:
                best_m, best_rate, plan.expected = m, rate, gain
            nxt += 1
            if not heap or nxt == len(budgets):
                break
            goal = budgets[nxt]
            # Could a larger budget still win, were every node to come worth the best one left?
            # (The heap orders by value less the hair: another entry may be worth a hair more.)
            v = heap[0][2] + 1e-8
            if not any((b + gain + (budgets[k] - m) * v) / costs[k] > best_rate for k in range(nxt, len(budgets))):
                break
        for j in sorted(taken[:best_m]):
            plan.setdefault(mine[j // c].seq_id, []).append(j % c)
        return plan

    def _chose(self, plan: AdaptivePlan) -> AdaptivePlan:
        self._plain_streak = 0 if plan else self._plain_streak + 1
        if not plan:
            self.calibration.idle()
        return plan

    @property
    def _sizes(self) -> list[int]:
        """The tree sizes the latency grid measured (the model may be replaced: read it now)."""
        return [n for n in self.latency.sizes if n > 0]

    def step_ms(self, batch_size: int, nodes: int, route: str = ROUTE) -> float:
        """A step of ``batch_size`` sequences verifying ``nodes`` tree nodes in all: the latency
        grid at nodes / batch_size a sequence, linear between the measured tree sizes, plus the
        driver's own work on those nodes."""
        return self._grid_ms(batch_size, nodes, route) + self.driver_ms_per_node * nodes

    def _grid_ms(self, batch_size: int, nodes: int, route: str) -> float:
        n = nodes / batch_size
        sizes = self._sizes
        lo = 0
        for s in sizes:
            if s >= n:
                hi = s
                break
            lo = s
        else:  # beyond the grid: the last interval's slope
            lo, hi = (sizes[-2] if len(sizes) > 1 else 0), sizes[-1]
        a, z = self.latency.ms(batch_size, lo, route), self.latency.ms(batch_size, hi, route)
        return a + (z - a) * (n - lo) / (hi - lo)

    def grid_size(self, batch_size: int, nodes: int) -> int:
        """The measured tree size nearest ``nodes / batch_size`` (what a served step teaches)."""
        n = nodes / max(1, batch_size)
        return min([0] + self._sizes, key=lambda s: abs(s - n))

    def propose_next(self, batch_size: int, route: str = ROUTE) -> bool:
        """Should this step's heads propose (for ``batch_size`` sequences)? Yes while trees are
        chosen. After a step that chose none, only now and then — the confidences are what
        could bring trees back, but a proposing step decides on the host path, which on a GPU
        costs a few plain steps: the first probe comes after as many steps as keep its extra
        cost within ``PROBE_BUDGET`` of plain decoding's time (at least ``PROBE_FIRST``), and
        every probe that brings no tree doubles the wait, up to ``PROBE_MAX``."""
        if self._plain_streak == 0:
            self._since_proposal, self._probe_every = 0, 0
            return True
        if not self._probe_every:
            plain = self.latency.ms(batch_size, 0, route)
            extra = max(0.0, self.step_ms(batch_size, batch_size, route) - plain) / plain
            self._probe_every = max(self.PROBE_FIRST, math.ceil(extra / self.PROBE_BUDGET))
        self._since_proposal += 1
        if self._since_proposal >= self._probe_every:
            self._since_proposal = 0
            self._probe_every = min(self.PROBE_MAX, 2 * self._probe_every)
            return True
        return False

    # ---- what served steps teach -------------------------------------------------------
    def observe_step(self, verified: Sequence[tuple[Sequence[int], Sequence[int], Sequence[float], Sequence[int]]]
                     ) -> None:
        """Per sequence that verified a tree: (its candidate indices, their tokens, their head
        probabilities, the tokens the step produced). A verified node whose parent was accepted
        is a trial; it succeeded when it was accepted too."""
        trials: list[tuple[int, float, bool]] = []
        for nodes, tokens, probs, produced in verified:
            by_node = {c: (t, p) for c, t, p in zip(nodes, tokens, probs)}
            parent = -1  # the accepted path so far (the root: always accepted)
            for depth in range(1, len(produced) + 1):
                nxt = -1
                for c in self.children[parent + 1]:
                    if c in by_node:
                        t, p = by_node[c]
                        ok = depth <= len(produced) - 1 and t == produced[depth - 1]
                        trials.append((depth, p, ok))
                        if ok:
                            nxt = c
                if nxt < 0:
                    break
                parent = nxt
        if trials:
            self.calibration.observe(trials)

    def observe_latency(self, batch_size: int, nodes: int, ms: float, route: str = ROUTE) -> None:
        """A served pure decode step of ``batch_size`` sequences and ``nodes`` tree nodes took
        ``ms`` (``learning_rate`` 0: the latency model learns nothing)."""
        if self.learning_rate > 0:
            # (The grid is the workers' time: the driver's share of the nodes, priced apart, is
            # taken out before the step corrects it — at most half the step, whatever the estimate.)
            ms = max(ms - self.driver_ms_per_node * nodes, 0.5 * ms)
            self.latency.observe(batch_size, self.grid_size(batch_size, nodes), ms, self.learning_rate, route)


def measure_driver_ms_per_node(parents: Sequence[int], depths: Sequence[int], batch: int = 64,
                               repeats: int = 5) -> float:
    """What one verified tree node costs the driver, on this host: ``AdaptiveTrees.select``
    planning ``batch`` sequences of sure heads (every node of the full tree worth taking) and
    ``observe_step`` learning from them, per node, the median of ``repeats`` (a few ms at
    start-up). A lower bound of the driver's Python work per node: the rest of its per-node
    bookkeeping is left to the served steps' corrections. Without this price the first plans
    take trees whose driver time alone outweighs what they save, where a verify token costs
    the device about as much as a node costs the driver (docs/performance.md)."""
    c = len(depths) - 1
    flat = LatencyModel([LatencyPoint(b, n, 1.0) for n in (0, c) for b in (1, batch)])
    probe = AdaptiveTrees(parents, depths, flat, margin=1.0, learning_rate=0.0)
    seqs = [Candidates(i, [1] * c, [0.9] * c) for i in range(batch)]
    per_node = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = probe.select(seqs, batch, batch * c)
        probe.observe_step([(nodes, [1] * len(nodes), [0.9] * len(nodes), [1] * (1 + max(probe.depths)))
                            for nodes in plan.values()])
        taken = sum(len(nodes) for nodes in plan.values())
        per_node.append(1e3 * (time.perf_counter() - t0) / max(1, taken))
    return sorted(per_node)[len(per_node) // 2]
