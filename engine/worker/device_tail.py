"""The device tail of a uniform step: decide → commit → propose without a host round trip.

A uniform step (every sequence one pending token plus the same tree, or none) whose sequences
all sample without logprobs, penalties or min_tokens masking decides on the device
(engine/sample/tail.py): the greedy tail when every sequence is greedy, else the sampled tail
with each sequence's parameters and rule (a rule with a device version). After a decode or
verify graph both are replayed from graphs captured at start-up, each followed by its own
copy to the host: the host waits for the decision only, and the proposal runs on while the
host applies the step's tokens (``ModelRunner.take_candidates`` collects it). Elsewhere the
same functions run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.attention.base import block_tables
from engine.core.config import SpeculativeConfig
from engine.core.sampling_params import SamplingParams, decides_on_host
from engine.sample.acceptance import device_rules
from engine.sample.decided import Decided
from engine.sample.sampler import seed_key
from engine.sample.tail import SpecTail
from engine.spec.tree import MedusaTree
from engine.worker.cuda_graphs import CudaGraphRunner, GraphTensors, RaggedStep
from engine.worker.input_batch import HostCopy, InputBatch


@dataclass(frozen=True)
class TailKey:
    """Which decision a uniform step's tail makes (and so which captured graph replays it)."""
    tree: Optional[MedusaTree]
    sampled: bool  # some sequence samples: the sampled tail (else the greedy one)
    rules: frozenset = frozenset()  # the acceptance rules present (verify steps only)
    filters: bool = False  # some sequence uses top-k / top-p
    greedy_rows: bool = False  # some sequence is greedy beside the sampled ones


# The tails of a step of adaptive trees (a ragged step's graph): the greedy decision, and the
# proposal with each candidate's confidence after it.
RAGGED_DECISION = "ragged-greedy"
RAGGED_PROPOSAL = "ragged-propose"


@dataclass(frozen=True)
class ProposeAfter:
    """The proposal that follows the decision ``decision`` (its own captured graph)."""
    decision: TailKey


class DeviceTail:
    def __init__(self, tail: SpecTail, graphs: Optional[CudaGraphRunner], spec: Optional[SpeculativeConfig],
                 proposes: bool, device: torch.device) -> None:
        self.tail, self.graphs, self.spec, self.device = tail, graphs, spec, device
        self.proposes = proposes  # the engine has heads
        self.decided, self.proposed = HostCopy(), HostCopy()

    def rule(self, params: SamplingParams) -> str:
        """The acceptance rule a sampled sequence's tree is decided by."""
        return params.acceptance or (self.spec.acceptance if self.spec else "greedy")

    def applies(self, batch: InputBatch) -> bool:
        """Does a device tail decide every sequence of the step? A uniform step, every sequence
        sampling, none with logprobs, min_tokens still masking stop tokens, penalties or logit
        bias, and — when it verifies a tree — every sampled sequence's rule one with a device
        version (a registered rule without one decides on the host path, by its own function)."""
        if batch.uniform_nodes is None or not all(
                s.sample and not decides_on_host(s.params, s.num_output_tokens) for s in batch.seqs):
            return False
        on_device = device_rules()
        return batch.tree is None or all(self.rule(s.params) in on_device for s in batch.seqs if not s.params.greedy)

    @staticmethod
    def ragged_applies(batch: InputBatch) -> bool:
        """Does the ragged tail decide every sequence of a step of adaptive trees? Every sequence
        decodes (one pending token, its adaptive tree or none) greedily, with nothing the host decides
        (logprobs, penalties, min_tokens, grammars). Sampled sequences decide on the host path."""
        return all(s.sample and len(s.token_ids) == 1 and s.params.greedy and (s.tree_nodes or not s.candidates)
                   and not decides_on_host(s.params, s.num_output_tokens) for s in batch.seqs)

    def run_ragged(self, batch: InputBatch, tree: MedusaTree, graph) -> tuple[list[Decided], bool]:
        """Decide and commit a step of adaptive trees after its ragged forward ``graph``, then
        (when the step proposes) start the proposal with confidences (its copy to the host is
        ``self.proposed``: [B, 2C] int64, candidates then the bits of their float64
        confidences, ``SpecTail.propose_confident_after``). Returns the real sequences'
        decisions, read back as soon as they are done, and whether a proposal was started."""
        b = len(batch.seqs)
        self.decided.start(self.graphs.run_tail(graph, RAGGED_DECISION, self.ragged_decision(tree))[:b])
        propose = self.proposes and batch.out.propose
        if propose:
            self.proposed.start(self.graphs.run_tail(graph, RAGGED_PROPOSAL, self.propose_confident,
                                                     after=RAGGED_DECISION)[:b])
        return [Decided.from_row(row, tree.depth) for row in self.decided.wait().tolist()], propose

    def ragged_decision(self, tree: MedusaTree):
        """The greedy decision over adaptive trees of ``tree``, as a tail on a ragged step's tensors."""
        return lambda t: self.tail.greedy_ragged(t.hidden, tree, t.ids, t.nodes, t.seqs, t.q_starts, t.starts,
                                                 t.tables)

    def propose_confident(self, t) -> torch.Tensor:
        return self.tail.propose_confident_after(t.hidden, t.after)

    def run(self, batch: InputBatch, hidden: torch.Tensor, graph) -> tuple[list[Decided], bool]:
        """Decide and commit the step on the device — replayed after the forward ``graph``, or
        eagerly on ``hidden`` — then, when the step proposes, start the proposal. Returns the
        real sequences' decisions, read back as soon as they are done, and whether a proposal
        was started (its copy to the host is ``self.proposed``)."""
        key, inputs = self._key(batch)
        propose = self.proposes and batch.out.propose
        b = len(batch.seqs)
        if graph is not None:
            decided = self.graphs.run_tail(graph, key, self.decision(key), inputs)[:b]
            proposal = lambda: self.graphs.run_tail(graph, ProposeAfter(key), self.propose, after=key)[:b]  # noqa: E731
        else:
            dev = self.device
            t = GraphTensors(hidden=hidden, tokens=torch.tensor(batch.ids, device=dev).view(b, batch.uniform_nodes),
                             starts=torch.tensor([s.start_pos for s in batch.seqs], device=dev)[:, None],
                             tables=block_tables([s.block_table for s in batch.seqs], dev).long(),
                             inputs=inputs.to(dev) if inputs is not None else None, after=None)
            decided = self.decision(key)(t)
            proposal = lambda: self.tail.propose_after(hidden, decided)  # noqa: E731
        self.decided.start(decided)  # enqueued before the proposal: the host waits for it alone
        if propose:
            self.proposed.start(proposal())
        depth = batch.tree.depth if batch.tree is not None else 0
        return [Decided.from_row(row, depth) for row in self.decided.wait().tolist()], propose

    def _key(self, batch: InputBatch) -> tuple[TailKey, Optional[torch.Tensor]]:
        """The step's decision and, for the sampled tail, its per-sequence inputs."""
        params = [s.params for s in batch.seqs]
        if all(p.greedy for p in params):
            return TailKey(batch.tree, sampled=False), None
        names = ["greedy" if p.greedy else self.rule(p) for p in params]
        key = TailKey(batch.tree, sampled=True, rules=frozenset(names) if batch.tree is not None else frozenset(),
                      filters=any(p.filtered for p in params), greedy_rows=any(p.greedy for p in params))
        return key, self.sampled_inputs(params, [s.seed for s in batch.seqs], names)

    @staticmethod
    def sampled_inputs(params: list[SamplingParams], seeds: list[int], rules: list[str]) -> torch.Tensor:
        """The sampled tail's per-sequence inputs [B, 5] (``SpecTail.sampled``): temperature,
        top_p, top_k (0: off), seed key, the rule's index in ``device_rules()`` (a plain step
        reads no rule: one without a device version stands as 0)."""
        index = device_rules()
        return torch.tensor([[p.temperature, p.top_p, max(p.top_k, 0), seed_key(seed),
                              index.index(rule) if rule in index else 0]
                             for p, seed, rule in zip(params, seeds, rules)], dtype=torch.float64)

    def decision(self, key: TailKey):
        """The decision ``key`` names, as a tail on a step's tensors."""
        if not key.sampled:
            return lambda t: self.tail.greedy(t.hidden, key.tree, t.tokens, t.starts, t.tables)
        return lambda t: self.tail.sampled(t.hidden, key.tree, t.tokens, t.starts, t.tables, t.inputs, key.rules,
                                           key.filters, key.greedy_rows)

    def propose(self, t: GraphTensors) -> torch.Tensor:
        return self.tail.propose_after(t.hidden, t.after)

    @torch.inference_mode()
    def capture(self, lm_head_weight: torch.Tensor, max_rows: int = 1) -> None:
        """Capture, after every decode and verify graph, the greedy tail and the sampled tails
        of the engine's acceptance rule — with and without top-k/top-p filters, with and
        without greedy sequences beside the sampled ones — each with and without proposals;
        also the proposal of host-decided steps (prefills, mixed steps, logprobs) for every
        batch bucket up to ``max_rows`` sequences. A decision with no graph (several rules in
        one step) runs eagerly after the replayed forward, and is counted (misses)."""
        if self.proposes:  # the host-decided steps' proposal, every batch bucket
            self.graphs.capture_rows("propose", self.tail.propose, [(lm_head_weight.shape[1],), ()],
                                     [lm_head_weight.dtype, torch.long], max_rows)
        for g in list(self.graphs.graphs.values()):
            if isinstance(g.shape, RaggedStep):  # a step of adaptive trees: its greedy tail
                self.graphs.run_tail(g, RAGGED_DECISION, self.ragged_decision(g.shape.tree))
                self.graphs.run_tail(g, RAGGED_PROPOSAL, self.propose_confident, after=RAGGED_DECISION)
        rule = self.spec.acceptance if self.spec is not None else "greedy"
        inputs = self.sampled_inputs([SamplingParams(temperature=1.0)], [0], [rule])  # (only the shape matters)
        for g in list(self.graphs.graphs.values()):
            if not g.decodes:
                continue
            keys = [(TailKey(g.shape, sampled=False), None)]
            # (A rule without a device version decides its tree steps on the host: no sampled
            # tail follows a verify graph then. Greedy rows of a sampled step decide by "greedy".)
            if g.shape is None or rule in device_rules():
                keys += [(TailKey(g.shape, True, frozenset({rule} | ({"greedy"} if greedy_rows else set()))
                                  if g.shape is not None else frozenset(), filters, greedy_rows), inputs)
                         for filters in (False, True) for greedy_rows in (False, True)]
            for key, args in keys:
                self.graphs.run_tail(g, key, self.decision(key), args)
                if self.proposes:
                    self.graphs.run_tail(g, ProposeAfter(key), self.propose, after=key)
