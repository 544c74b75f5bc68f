"""ModelRunner: SchedulerOutput → one forward pass → StepResult, in phases:

    prepare   flat ids for every scheduled token (prefill chunks, pending tokens, tree
              candidates; engine/worker/input_batch.py); for steps that run eagerly or prefill
              through a graph also their positions, K/V slots and attention inputs
              (``InputBatch.locate``: a decode or verify graph derives those on the device from
              each sequence's start and block table)
    forward   the model over all of them — a CUDA graph replay (engine/worker/cuda_graphs.py) for
              decode and verify steps, new prompts prefilled from position 0, and any other
              step without a tree (mixed: prefill chunks and decode tokens, padded to a token
              bucket), else eager; either way the final hidden states
    decide    on the device for a uniform step (engine/worker/device_tail.py: decide → commit
              → propose, captured after the forward graph) and for a greedy step of adaptive
              trees (a ragged step's graph and its tails, ``RaggedStep``), else on the host
              (engine/sample/host_decision.py) followed by the same commit and proposal

The runner makes no policy decisions: which tree each sequence verifies and whether to propose
come from the scheduler. ``execute(out, defer_candidates=True)`` returns a uniform step's tokens
as soon as its decision is on the host; its proposal runs on while the host applies them, and
``take_candidates()`` collects it before the next step (the in-process executor's path; a Ray
worker returns everything at once).
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.attention.base import AttentionBackend, StepAttnInputs
from engine.core.config import SpeculativeConfig
from engine.core.outputs import Drafts, SchedulerOutput, SeqResult, StepResult
from engine.sample.decided import Decided
from engine.sample.host_decision import HostDecider, logits_rows
from engine.sample.tail import SpecTail
from engine.spec.proposer import MedusaProposer
from engine.spec.tree import CutTrees, MedusaTree
from engine.worker.cuda_graphs import CudaGraphRunner, graphable_nodes
from engine.worker.device_tail import DeviceTail
from engine.worker.input_batch import InputBatch


class ModelRunner:
    def __init__(self, model, backend: AttentionBackend, device: torch.device,
                 eos_token_ids: tuple[int, ...], proposer: Optional[MedusaProposer] = None,
                 spec: Optional[SpeculativeConfig] = None, graphs: Optional[CudaGraphRunner] = None) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.kv_cache = backend.kv_cache
        # Fixed-shape steps replay CUDA graphs when given; everything else runs eager.
        self.graphs = graphs
        self.proposer, self.spec = proposer, spec
        self.tail = SpecTail(self.kv_cache, model.lm_head, proposer, *((spec.epsilon, spec.alpha) if spec else ()))
        self.device_tail = DeviceTail(self.tail, graphs, spec, proposer is not None, device)
        self.host = HostDecider(spec.acceptance if spec else "greedy", *((spec.epsilon, spec.alpha) if spec
                                                                       else (0.09, 0.3)), eos_token_ids)
        # Trees a step may verify, by candidate count: the full tree, and with back-off the
        # smaller trees nested in it (the scheduler cuts each sequence's candidates down).
        self.trees: dict[int, MedusaTree] = {}
        # Adaptive trees (speculative.adaptive): the full tree cut down to a sequence's candidates.
        self.cut_trees: Optional[CutTrees] = None
        if proposer is not None:
            self.set_trees({proposer.tree.num_nodes - 1: proposer.tree})
        # Adaptive trees: steps with trees of their own or proposals with confidences (ragged
        # steps, or the host path).
        self.adaptive = spec is not None and spec.adaptive
        # The last step deferred its candidates (device_tail.proposed): "uniform" or "ragged"
        # (a ragged step's proposal carries confidences), None when it did not.
        self._candidates_owed: Optional[str] = None

    @property
    def tree(self) -> Optional[MedusaTree]:
        """The full tree (the proposer's): every other tree of the set is nested in it."""
        return self.proposer.tree if self.proposer is not None else None

    def set_trees(self, trees: dict[int, MedusaTree]) -> None:
        """The tree set: candidate count → tree; the largest is the full tree the heads propose."""
        self.trees = dict(trees)
        full = self.proposer.tree = trees[max(trees)]
        self.cut_trees = CutTrees(full, trees.values())

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        """One step. ``defer_candidates``: a uniform or ragged step that proposes returns its
        results with ``candidates_deferred`` set and no ``next_candidates``, once its tokens are
        known; ``take_candidates()`` gives them, in the order of the results."""
        self._candidates_owed = None  # candidates nobody took are dropped (HostCopy waits for its copy)
        g = self.graphs
        captured_before, misses_before = (g.capture_seconds, g.misses) if g is not None else (0.0, 0)
        result = self._execute(out, defer_candidates)
        if g is not None:
            result.captured = g.capture_seconds > captured_before
            result.graph_misses = g.misses - misses_before
        return result

    def take_candidates(self) -> Drafts:
        """The next candidates (and a ragged step's confidences) of the last step that deferred
        them, one list per result."""
        owed, self._candidates_owed = self._candidates_owed, None
        if not owed:
            raise RuntimeError("take_candidates: the last step deferred no candidates")
        proposal = self.device_tail.proposed.wait()
        if owed == "ragged":
            return self._unpack(proposal)
        return Drafts(candidates=proposal.tolist())

    def _unpack(self, proposal: torch.Tensor) -> Drafts:
        """A ragged step's proposal on the host ([B, 2C] int64: candidates, then the bits of
        their float64 confidences, ``SpecTail.propose_confident_after``)."""
        c = self.tree.num_nodes - 1
        return Drafts(candidates=proposal[:, :c].tolist(),
                      confidence=proposal[:, c:].contiguous().view(torch.float64).tolist())

    def _execute(self, out: SchedulerOutput, defer_candidates: bool) -> StepResult:
        if not out.seqs:
            return StepResult(step_id=out.step_id, results=[])
        batch = InputBatch.build(out, self.trees, self.kv_cache.scratch_tokens,
                                 self.cut_trees.get if self.cut_trees is not None else None)
        # A step of adaptive trees, or one whose proposal must report confidences: a ragged
        # step's graph and tails when every sequence decodes greedily, else the host path.
        adaptive_step = self.adaptive and (out.propose or any(s.tree_nodes for s in out.seqs))
        if adaptive_step and self.graphs is not None and self.device_tail.ragged_applies(batch):
            shape = self.graphs.ragged_shape(self.tree, out.seqs)
            graph = self.graphs.run_ragged(*shape, out.seqs) if shape is not None else None
            if graph is not None:
                return self._ragged_step(batch, graph, defer_candidates)
        graph, hidden = self.run_model(batch)
        if adaptive_step or not self.device_tail.applies(batch):
            return StepResult(step_id=out.step_id, results=self.decide_on_host(batch, hidden))
        decided, proposed = self.device_tail.run(batch, hidden, graph)
        depth = batch.tree.depth if batch.tree is not None else 0
        deferred = proposed and defer_candidates
        self._candidates_owed = "uniform" if deferred else None
        cands = self.device_tail.proposed.wait().tolist() if proposed and not deferred else None
        results = [SeqResult(seq_id=s.seq_id, sampled_token_ids=d.tokens, num_accepted=d.num_accepted,
                             accepted_per_depth=d.accepted_per_depth(depth),
                             next_candidates=cands[i] if cands is not None else [])
                   for i, (s, d) in enumerate(zip(out.seqs, decided))]
        return StepResult(step_id=out.step_id, results=results, candidates_deferred=deferred)

    def _ragged_step(self, batch: InputBatch, graph, defer_candidates: bool) -> StepResult:
        """A ragged step's result: its decisions and, when it proposed, each sequence's next
        candidates and their confidences — deferred like a uniform step's when asked."""
        decided, proposed = self.device_tail.run_ragged(batch, self.tree, graph)
        depth = self.tree.depth
        results = [SeqResult(seq_id=s.seq_id, sampled_token_ids=d.tokens, num_accepted=d.num_accepted,
                             accepted_per_depth=d.accepted_per_depth(depth) if s.tree_size else [])
                   for s, d in zip(batch.seqs, decided)]
        deferred = proposed and defer_candidates
        if proposed and not deferred:
            drafts = self._unpack(self.device_tail.proposed.wait())
            for r, nxt, conf in zip(results, drafts.candidates, drafts.confidence):
                r.next_candidates, r.next_confidence = nxt, conf
        self._candidates_owed = "ragged" if deferred else None
        return StepResult(step_id=batch.out.step_id, results=results, candidates_deferred=deferred)

    def run_model(self, batch: InputBatch):
        """(the decode or verify graph replayed, or None; the final hidden states [T', H]): the
        step's own T tokens first, padding after them in a graph."""
        seqs, graphs = batch.seqs, self.graphs
        if graphs is not None and graphable_nodes(seqs, batch.uniform_nodes, graphs.width):
            graph = graphs.run(batch.tree, seqs, batch.ids)
            if graph is not None:
                return graph, graph.hidden
        # Not a decode or verify graph's step, or (counted) no graph of its shape.
        batch.locate(self.kv_cache)
        hidden = None
        if graphs is not None and (prefill := graphs.prefill_shape(seqs)) is not None:
            hidden = graphs.run_prefill(prefill, seqs, batch.ids, batch.slots)
        elif graphs is not None and (mixed := graphs.mixed_shape(seqs)) is not None:
            hidden = graphs.run_mixed(mixed, seqs, batch.ids, batch.positions, batch.slots)
        return None, hidden if hidden is not None else self.forward(batch)

    def forward(self, batch: InputBatch) -> torch.Tensor:
        """Eager forward over the step's tokens → final hidden states [T, H]."""
        # (Adaptive trees' masks padded to the full tree's nodes, as a ragged step's graph has them.)
        ragged = batch.tree is None and any(t is not None for t in batch.seq_trees)
        meta = self.backend.prepare(StepAttnInputs(seqs=batch.attn, slot_mapping=torch.tensor(batch.slots),
                                                   ragged_nodes=self.tree.num_nodes if ragged else 0))
        return self.model(torch.tensor(batch.ids, device=self.device),
                          torch.tensor(batch.positions, device=self.device), self.backend, meta)

    def decide_on_host(self, batch: InputBatch, hidden: torch.Tensor) -> list[SeqResult]:
        """The host path: logits for the rows a decision reads, the decisions
        (engine/sample/host_decision.py), then the commit of accepted nodes and the proposals."""
        seqs, dev = batch.seqs, self.device
        ranges, rows = logits_rows(seqs, batch.offsets)
        if not rows:
            return [SeqResult(seq_id=s.seq_id, sampled_token_ids=[]) for s in seqs]
        decisions = self.host.decide(seqs, ranges, self.model.compute_logits(hidden[torch.tensor(rows, device=dev)]),
                                     batch.seq_trees)
        depth = self.tree.depth if self.tree is not None else 0  # (accepted_per_depth: the full tree's depths)
        results, src, dst, last = [], [], [], []
        for s, offset, d, tree in zip(seqs, batch.offsets, decisions, batch.seq_trees):
            if d is None:
                results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[]))
                continue
            for node in d.path[1:]:  # accepted nodes: their K/V from the scratch rows to their slots
                src.append(offset + node)
                dst += self.kv_cache.host_slots(s.block_table, s.start_pos + tree.depths[node], 1)
            last.append(offset + len(s.token_ids) - 1 + d.path[-1])
            kept = Decided(len(d.path) - 1, d.tokens)
            results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=d.tokens, logprobs=d.logprobs,
                                     top_logprobs=d.top_logprobs, num_accepted=kept.num_accepted,
                                     accepted_per_depth=kept.accepted_per_depth(depth) if s.tree_size else []))
        if src:
            self.tail.commit(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
        if self.proposer is not None and last and batch.out.propose:
            roots = torch.tensor([r.sampled_token_ids[-1] for r in results if r.sampled_token_ids], device=dev)
            proposed = self._propose(hidden[torch.tensor(last, device=dev)], roots)
            cands = iter(proposed[0].tolist())
            confidence = iter(proposed[1].tolist()) if proposed[1] is not None else None
            for r in results:
                if r.sampled_token_ids:
                    r.next_candidates = next(cands)
                    if confidence is not None:
                        r.next_confidence = next(confidence)
        return results

    def _propose(self, hidden: torch.Tensor, roots: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The heads' proposal for a host-decided step (engine/sample/tail.py ``SpecTail.propose``),
        from a graph per batch bucket when the engine has graphs; with adaptive trees (eager)
        also each candidate's confidence."""
        if self.adaptive:
            return self.proposer.propose_with_confidence(hidden, roots)
        if self.graphs is None:
            return self.tail.propose(hidden, roots), None
        return self.graphs.run_rows("propose", self.tail.propose, [hidden, roots]), None

    def capture_tails(self, max_rows: int = 1) -> None:
        """Capture the device tails after every decode and verify graph, and the host-decided
        steps' proposal (engine/worker/device_tail.py ``DeviceTail.capture``)."""
        if self.graphs is not None:
            self.device_tail.capture(self.model.lm_head.weight, max_rows)
