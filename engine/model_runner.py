"""ModelRunner: SchedulerOutput → one forward pass → StepResult, in phases:

    prepare   flat ids for every scheduled token (prefill chunks, pending tokens, tree
              candidates); for steps that run eagerly or prefill through a graph also their
              positions, K/V slots and attention inputs (``locate``: a decode or verify graph
              derives those on the device from each sequence's start and block table)
    forward   the model over all of them — a CUDA graph replay (engine/cuda_graphs.py) for
              decode and verify steps, new prompts prefilled from position 0, and any other
              step without a tree (mixed: prefill chunks and decode tokens, padded to a token
              bucket), else eager; either way the final hidden states
    logits    the lm_head on the rows a decision reads
    decide    acceptance: the accepted tree path and bonus token (or the sampled token)
    commit    the accepted tree nodes' K/V from the cache's scratch region into their slots
    propose   the Medusa heads at each sequence's last accepted token

Decide → commit → propose is spec_decode/tail.py: for a uniform step it runs wholly on the
device — the greedy tail, or the sampled tail when some sequence samples — captured after the
forward graph on CUDA, called eagerly elsewhere; other steps (logprobs, penalties, min_tokens
masking, prefill in the step) decide on the host with the acceptance rules and then use the
same commit and propose. The runner makes no policy decisions: which tree each sequence
verifies and whether to propose come from the scheduler.

A uniform step's decision and proposal are two graphs, each followed by its own copy to the
host. ``execute(out, defer_candidates=True)`` waits for the decision only and returns the
step's tokens; the proposal — 22 launches with the bundled heads, ~0.15 ms at batch 1 on an
H100 — runs on while the host applies those tokens, and ``take_candidates()`` collects it before the
next step (the in-process executor's path; a Ray worker returns everything at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.attention.base import AttentionBackend, SeqAttn, StepAttnInputs, block_tables
from engine.config import SpeculativeConfig
from engine.cuda_graphs import CudaGraphRunner, graphable_nodes
from engine.sampling import (SamplingParams, apply_penalties, decides_on_host, params_rows, processed_probs_rows,
                             seed_key)
from scheduler.outputs import ScheduledSeq, SchedulerOutput, SeqResult, StepResult
from spec_decode.acceptance import Accepted, accept, accept_greedy_batch, keyed_targets
from spec_decode.proposer import MedusaProposer
from spec_decode.tail import SAMPLED_RULES, SpecTail
from spec_decode.tree import MedusaTree


@dataclass
class InputBatch:
    """One step, flattened: sequence after sequence, each its input tokens then its tree's
    candidates."""
    out: SchedulerOutput
    tree: Optional[MedusaTree]  # the tree this step's decoding sequences verify (one per step)
    ids: list[int]
    offsets: list[int]  # first flat row of each sequence
    # Filled by ModelRunner.locate (steps that are not a decode or verify graph's):
    positions: list[int]
    slots: list[int]  # where each token's K/V is written (tree nodes: the scratch region)
    attn: list[SeqAttn]
    # Query tokens per sequence when every sequence runs one pending token plus the same
    # tree (or nothing more): the step has a fixed shape. None otherwise.
    uniform_nodes: Optional[int]

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.out.seqs


class HostCopy:
    """A device tensor's copy to the host, enqueued now and waited for later: on CUDA into
    page-locked memory (an asynchronous copy needs it), reused from step to step, with an event
    that tells when it landed; elsewhere the tensor itself (nothing is asynchronous there)."""

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None
        self._out: Optional[torch.Tensor] = None
        self._event = None  # made on the first copy, recorded again by each one
        self._in_flight = False

    def start(self, t: torch.Tensor) -> "HostCopy":
        self.wait()  # the buffer's previous copy must have landed before it is reused
        if t.device.type != "cuda":
            self._out = t
            return self
        if self._buf is None or self._buf.numel() < t.numel() or self._buf.dtype != t.dtype:
            self._buf = torch.empty(max(t.numel(), 1), dtype=t.dtype, pin_memory=True)
        self._out = self._buf[:t.numel()].view(t.shape)
        self._out.copy_(t, non_blocking=True)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record()
        self._in_flight = True
        return self

    def wait(self) -> Optional[torch.Tensor]:
        """The copied tensor (None when nothing was started); valid until the next ``start``."""
        if self._in_flight:
            self._event.synchronize()
            self._in_flight = False
        return self._out


class ModelRunner:
    def __init__(self, model, backend: AttentionBackend, device: torch.device,
                 eos_token_ids: tuple[int, ...], proposer: Optional[MedusaProposer] = None,
                 spec: Optional[SpeculativeConfig] = None, graphs: Optional[CudaGraphRunner] = None) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.kv_cache = backend.kv_cache
        # Fixed-shape steps replay CUDA graphs when given; everything else runs eager.
        self.graphs = graphs
        self.eos_token_ids = eos_token_ids
        self.proposer, self.spec = proposer, spec
        self.tail = SpecTail(self.kv_cache, model.lm_head, proposer, *((spec.epsilon, spec.alpha) if spec else ()))
        # Trees a step may verify, by candidate count: the full tree, and with back-off the
        # smaller trees nested in it (the scheduler cuts each sequence's candidates down).
        self.trees: dict[int, MedusaTree] = {}
        if proposer is not None:
            self.set_trees({proposer.tree.num_nodes - 1: proposer.tree})
        self.block_size = self.kv_cache.block_size
        self._decided, self._proposed = HostCopy(), HostCopy()
        self._candidates_owed = False  # the last step deferred its candidates (self._proposed)

    @property
    def tree(self) -> Optional[MedusaTree]:
        """The full tree (the proposer's): every other tree of the set is nested in it."""
        return self.proposer.tree if self.proposer is not None else None

    def set_trees(self, trees: dict[int, MedusaTree]) -> None:
        """The tree set: candidate count → tree; the largest is the full tree the heads propose."""
        self.trees = dict(trees)
        self.proposer.tree = trees[max(trees)]

    def _slots(self, block_table: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, start + n)]

    # ---- phases -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        """One step. ``defer_candidates``: a uniform step that proposes returns its results
        with ``candidates_deferred`` set and no ``next_candidates``, once its tokens are known;
        ``take_candidates()`` gives them, in the order of the results."""
        self._candidates_owed = False  # candidates nobody took are dropped (HostCopy waits for its copy)
        g = self.graphs
        captured_before, misses_before = (g.capture_seconds, g.misses) if g is not None else (0.0, 0)
        result = self._execute(out, defer_candidates)
        if g is not None:
            result.captured = g.capture_seconds > captured_before
            result.graph_misses = g.misses - misses_before
        return result

    def take_candidates(self) -> list[list[int]]:
        """The next candidates of the last step that deferred them, one list per result."""
        if not self._candidates_owed:
            raise RuntimeError("take_candidates: the last step deferred no candidates")
        self._candidates_owed = False
        return self._proposed.wait().tolist()

    def _execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        if not out.seqs:
            return StepResult(step_id=out.step_id, results=[])
        batch = self.prepare(out)
        graph, hidden = None, None
        if self.graphs is not None and graphable_nodes(out.seqs, batch.uniform_nodes, self.graphs.width):
            graph = self.graphs.run(batch.tree, out.seqs, batch.ids)
            hidden = graph.hidden if graph is not None else None
        if hidden is None:  # not a decode or verify graph's step, or (counted) no graph of its shape
            self.locate(batch)
            if self.graphs is not None and (prefill := self.graphs.prefill_shape(out.seqs)) is not None:
                hidden = self.graphs.run_prefill(prefill, out.seqs, batch.ids, batch.slots)
            elif self.graphs is not None and (mixed := self.graphs.mixed_shape(out.seqs)) is not None:
                hidden = self.graphs.run_mixed(mixed, out.seqs, batch.ids, batch.positions, batch.slots)
            if hidden is None:
                hidden = self.forward(batch)
        if self._device_tail_applies(batch):
            rows, proposed = self.device_tail(batch, hidden, graph)
            if proposed and defer_candidates:
                self._candidates_owed = True
                return StepResult(step_id=out.step_id, results=self._tail_results(out, batch.tree, rows),
                                  candidates_deferred=True)
            cands = self._proposed.wait().tolist() if proposed else None
            return StepResult(step_id=out.step_id, results=self._tail_results(out, batch.tree, rows, cands))
        return self.sample(batch, hidden)

    def prepare(self, out: SchedulerOutput) -> InputBatch:
        sizes = {s.tree for s in out.seqs if s.tree}
        if len(sizes) > 1 or not sizes <= self.trees.keys():
            raise ValueError(f"step {out.step_id}: trees {sorted(sizes)} do not fit the engine's "
                             f"trees {sorted(self.trees)} (one tree per step)")
        tree = self.trees[sizes.pop()] if sizes else None
        batch = InputBatch(out=out, tree=tree, ids=[], offsets=[], positions=[], slots=[], attn=[],
                           uniform_nodes=None)
        for s in out.seqs:
            n = len(s.token_ids)
            if s.tree and (n != 1 or len(s.candidates) != s.tree):
                raise ValueError(f"seq {s.seq_id}: a {s.tree}-candidate tree follows exactly one pending token "
                                 f"and has {s.tree} candidates, got {n} tokens and {len(s.candidates)}")
            batch.offsets.append(len(batch.ids))
            batch.ids += s.token_ids
            if s.tree:
                batch.ids += s.candidates
        if tree is not None and len(batch.ids) > self.kv_cache.scratch_tokens:
            raise ValueError(f"step {out.step_id}: {len(batch.ids)} tokens exceed the K/V scratch region "
                             f"({self.kv_cache.scratch_tokens})")
        if all(len(s.token_ids) == 1 for s in out.seqs):
            counts = {s.tree for s in out.seqs}
            if len(counts) == 1:
                batch.uniform_nodes = counts.pop() + 1
        return batch

    def locate(self, batch: InputBatch) -> None:
        """Every token's position, K/V slot (tree candidates: their rows of the scratch region)
        and the attention inputs of each sequence."""
        scratch, tree = self.kv_cache.scratch_slot0, batch.tree
        for s, row in zip(batch.seqs, batch.offsets):
            n = len(s.token_ids)
            batch.positions += range(s.start_pos, s.start_pos + n)
            batch.slots += self._slots(s.block_table, s.start_pos, n)
            if s.tree:
                batch.positions += [s.start_pos + d for d in tree.depths[1:]]
                batch.slots += range(scratch + row + n, scratch + row + n + s.tree)
            batch.attn.append(SeqAttn(q_len=n + s.tree, ctx_len=s.start_pos, block_table=s.block_table,
                                      tree_mask=tree.mask if s.tree else None))

    def forward(self, batch: InputBatch) -> torch.Tensor:
        """Eager forward over the step's tokens → final hidden states [T, H]."""
        meta = self.backend.prepare(StepAttnInputs(seqs=batch.attn, slot_mapping=torch.tensor(batch.slots)))
        return self.model(torch.tensor(batch.ids, device=self.device),
                          torch.tensor(batch.positions, device=self.device), self.backend, meta)

    def device_tail(self, batch: InputBatch, hidden: torch.Tensor, graph) -> tuple[list[list[int]], bool]:
        """Decide and commit for a uniform step on the device (spec_decode/tail.py): the greedy
        tail when every sequence is greedy, else the sampled tail with each sequence's sampling
        parameters and rule; then, when the step proposes, the heads' proposal from what was
        decided — each replayed after the forward graph, or called eagerly. Returns the real
        sequences' decided rows (``SpecTail.greedy``'s), read back as soon as the decision is
        done, and whether a proposal was started (its copy to the host is ``self._proposed``)."""
        propose = self.proposer is not None and batch.out.propose
        tree = batch.tree
        params = [s.params or SamplingParams() for s in batch.seqs]
        sampled = not all(p.greedy for p in params)
        inputs, rules, filters, greedy_rows = None, frozenset(), False, False
        if sampled:
            names = ["greedy" if p.greedy else self._rule(p) for p in params]
            inputs = self._sampled_tail_inputs(params, [s.seed for s in batch.seqs], names)
            rules = frozenset(names) if tree is not None else frozenset()
            filters = any(p.filtered for p in params)
            greedy_rows = any(p.greedy for p in params)

        key = (tree, sampled, rules, filters, greedy_rows)
        b = len(batch.seqs)
        if graph is not None:
            decided = self.graphs.run_tail(graph, key, self._tail_builder(key), inputs)[:b]
            proposal = lambda: self.graphs.run_tail(graph, ("propose", key), self._propose_builder(key))[:b]  # noqa: E731
        else:
            n = batch.uniform_nodes
            dev = self.device
            tables = block_tables([s.block_table for s in batch.seqs], dev).long()
            tokens = torch.tensor(batch.ids, device=dev).view(b, n)
            start = torch.tensor([s.start_pos for s in batch.seqs], device=dev)[:, None]
            static = inputs.to(dev) if inputs is not None else None
            decided = self._tail(key, hidden, tokens, start, tables, static)
            proposal = lambda: self.tail.propose_after(hidden, decided)  # noqa: E731
        self._decided.start(decided)  # enqueued before the proposal: the host waits for it alone
        if propose:
            self._proposed.start(proposal())
        return self._decided.wait().tolist(), propose

    @staticmethod
    def _sampled_tail_inputs(params: list[SamplingParams], seeds: list[int], rules: list[str]) -> torch.Tensor:
        """The sampled tail's per-sequence inputs [B, 5] (spec_decode/tail.py ``SpecTail.sampled``):
        temperature, top_p, top_k (0: off), seed key, the rule's index in ``SAMPLED_RULES`` (a
        plain step reads no rule: one the tail does not implement stands as 0)."""
        return torch.tensor([[p.temperature, p.top_p, max(p.top_k, 0), seed_key(seed),
                              SAMPLED_RULES.index(rule) if rule in SAMPLED_RULES else 0]
                             for p, seed, rule in zip(params, seeds, rules)], dtype=torch.float64)

    def _tail(self, key, hidden, tokens, start, tables, static) -> torch.Tensor:
        """The device decision ``key`` = (tree, sampled, rules, filters, greedy_rows) names."""
        tree, sampled, rules, filters, greedy_rows = key
        if not sampled:
            return self.tail.greedy(hidden, tree, tokens, start, tables)
        return self.tail.sampled(hidden, tree, tokens, start, tables, static, rules, filters, greedy_rows)

    def _tail_builder(self, key) -> Callable:
        """What CudaGraphRunner.run_tail captures for the decision ``key``, reading a graph's views."""
        def build(g, static) -> Callable[[], torch.Tensor]:
            return lambda: self._tail(key, g.hidden, g.tokens, g.starts, g.tables, static)
        return build

    def _propose_builder(self, key) -> Callable:
        """What CudaGraphRunner.run_tail captures for the proposal after the decision ``key``:
        it reads that decision's output (``tail_outputs``: on CUDA the same static tensor every
        replay; uncaptured, the latest call's)."""
        def build(g, _) -> Callable[[], torch.Tensor]:
            return lambda: self.tail.propose_after(g.hidden, g.tail_outputs[key])
        return build

    @torch.inference_mode()
    def capture_tails(self, max_rows: int = 1) -> None:
        """Capture, after every decode and verify graph, the greedy tail and the sampled tails
        of the engine's acceptance rule — with and without top-k/top-p filters, with and
        without greedy sequences beside the sampled ones — each with and without proposals;
        also the proposal of host-decided steps (prefills, mixed steps, logprobs) for every
        batch bucket up to ``max_rows`` sequences. The graph runner is sealed afterwards: a
        decision it has no graph for (several acceptance rules in one step) runs eagerly after
        the replayed forward, and is counted (CudaGraphRunner.misses)."""
        if self.graphs is None:
            return
        if self.proposer is not None:  # the host-decided steps' proposal, every batch bucket
            weight = self.model.lm_head.weight
            self.graphs.capture_rows("propose", self.tail.propose, [(weight.shape[1],), ()],
                                     [weight.dtype, torch.long], max_rows)
        rule = self.spec.acceptance if self.spec is not None else "greedy"
        # One sampling sequence's inputs: the capture only needs their shape.
        inputs = self._sampled_tail_inputs([SamplingParams(temperature=1.0)], [0], [rule])
        for g in list(self.graphs.graphs.values()):
            if not g.decodes:
                continue
            # Greedy sequences of a sampled step decide by the greedy rule (exact match).
            rules = {rows: frozenset({rule} | ({"greedy"} if rows else set())) if g.shape is not None else frozenset()
                     for rows in (False, True)}
            keys = [((g.shape, False, frozenset(), False, False), ())]
            # (A registered rule without a device version decides its tree steps on the host,
            # ``_device_tail_applies``: no sampled tail follows a verify graph then.)
            if g.shape is None or rule in SAMPLED_RULES:
                keys += [((g.shape, True, rules[greedy_rows], filters, greedy_rows), (inputs,))
                         for filters in (False, True) for greedy_rows in (False, True)]
            for key, args in keys:
                self.graphs.run_tail(g, key, self._tail_builder(key), *args)
                if self.proposer is not None:
                    self.graphs.run_tail(g, ("propose", key), self._propose_builder(key))

    def sample(self, batch: InputBatch, hidden: torch.Tensor) -> StepResult:
        """The host path: logits for the rows a decision reads, then per sequence the
        acceptance rule (greedy sequences batched), commit and proposals."""
        out, tree = batch.out, batch.tree
        # Rows whose logits are needed: the last token of sampling sequences, every tree node.
        row_ranges: list[Optional[tuple[int, int]]] = []
        rows: list[int] = []
        for s, offset in zip(out.seqs, batch.offsets):
            if not s.sample:
                row_ranges.append(None)
                continue
            row_ranges.append((len(rows), s.tree + 1))
            first = offset + len(s.token_ids) - 1
            rows += range(first, first + s.tree + 1)
        if not rows:
            return StepResult(step_id=out.step_id, results=[SeqResult(seq_id=s.seq_id, sampled_token_ids=[])
                                                            for s in out.seqs])
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        for s, rr in zip(out.seqs, row_ranges):
            if rr is not None:
                params = s.params or SamplingParams()
                if params.penalized:
                    self._penalize(logits[rr[0]:rr[0] + rr[1]], s, params, tree)
                self._mask_before_min_tokens(logits[rr[0]:rr[0] + rr[1]], s, params, tree)
        decided = self._decide(out.seqs, row_ranges, logits, tree)

        results: list[SeqResult] = []
        commit_rows: list[int] = []
        commit_dst: list[int] = []
        last_rows: list[int] = []
        for s, offset, rr in zip(out.seqs, batch.offsets, row_ranges):
            if rr is None:
                results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[]))
                continue
            params = s.params or SamplingParams()
            path, new_tokens = decided[s.seq_id]
            for node in path[1:]:
                commit_rows.append(offset + node)
                commit_dst.append(self._slots(s.block_table, s.start_pos + tree.depths[node], 1)[0])
            logprobs: list[float] = []
            top: list[list[tuple[int, float]]] = []
            if params.logprobs:
                lp = torch.log_softmax(logits[rr[0]:rr[0] + rr[1]], dim=-1)
                logprobs = [float(lp[node, tok]) for node, tok in zip(path, new_tokens)]
                if params.top_logprobs:
                    vals, ids = torch.topk(lp[path], params.top_logprobs, dim=-1)
                    top = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            last_rows.append(offset + len(s.token_ids) - 1 + path[-1])
            n_acc = len(path) - 1
            results.append(SeqResult(
                seq_id=s.seq_id, sampled_token_ids=new_tokens, logprobs=logprobs, top_logprobs=top, num_accepted=n_acc,
                accepted_per_depth=[int(n_acc > d) for d in range(tree.depth)] if s.tree else [],
            ))
        if commit_rows:
            self.tail.commit(torch.tensor(commit_rows, device=self.device),
                             torch.tensor(commit_dst, device=self.device))
        if self.proposer is not None and last_rows and out.propose:
            roots = torch.tensor([r.sampled_token_ids[-1] for r in results if r.sampled_token_ids], device=self.device)
            cands = iter(self._propose(hidden[torch.tensor(last_rows, device=self.device)], roots).tolist())
            for res in results:
                if res.sampled_token_ids:
                    res.next_candidates = next(cands)
        return StepResult(step_id=out.step_id, results=results)

    def _propose(self, hidden: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """The heads' proposal for a host-decided step (spec_decode/tail.py ``SpecTail.propose``),
        from a graph per batch bucket when the engine has graphs."""
        if self.graphs is None:
            return self.tail.propose(hidden, roots)
        return self.graphs.run_rows("propose", self.tail.propose, [hidden, roots])

    def _decide(self, seqs: list[ScheduledSeq], row_ranges, logits: torch.Tensor,
                tree: Optional[MedusaTree]) -> dict[int, tuple[list[int], list[int]]]:
        """seq_id → (accepted path, new tokens) for every sequence that samples. Greedy ones are
        decided together, one device→host copy for the batch: trees by the batched greedy rule,
        plain decodes by one argmax; sampled plain rows by one batched keyed draw; sampled trees
        by their acceptance rule."""
        decided: dict[int, tuple[list[int], list[int]]] = {}
        greedy = [(s, rr) for s, rr in zip(seqs, row_ranges) if rr is not None and (s.params or SamplingParams()).greedy]
        greedy_tree = [(s, rr) for s, rr in greedy if s.tree]
        greedy_plain = [(s, rr) for s, rr in greedy if not s.tree]
        accepted: dict[int, Accepted] = {}
        if greedy_tree:
            idx = torch.tensor([r0 for _, (r0, _) in greedy_tree], device=self.device)
            stacked = logits[idx[:, None] + torch.arange(tree.num_nodes, device=self.device)]
            toks = torch.tensor([s.token_ids[-1:] + s.candidates for s, _ in greedy_tree], device=self.device)
            accepted.update({s.seq_id: a for (s, _), a in zip(greedy_tree, accept_greedy_batch(tree, toks, stacked))})
        if greedy_plain:
            idx = torch.tensor([r0 for _, (r0, _) in greedy_plain], device=self.device)
            for (s, _), tok in zip(greedy_plain, logits.index_select(0, idx).argmax(-1).tolist()):
                decided[s.seq_id] = [0], [tok]
        # Sampled plain rows (a prompt's first token, a decode without a tree) in one batched
        # draw — per row what sample_token draws (the same keys, a row's probabilities do not
        # depend on the others) — instead of a few dozen small kernels and a sync per sequence.
        sampled_plain = [(s, rr) for s, rr in zip(seqs, row_ranges)
                         if rr is not None and not s.tree and s.seq_id not in decided]
        if sampled_plain:
            ps = [s.params or SamplingParams() for s, _ in sampled_plain]
            dev = self.device
            probs = processed_probs_rows(
                logits.index_select(0, torch.tensor([r0 for _, (r0, _) in sampled_plain], device=dev)),
                *params_rows(ps, dev), filters=any(p.filtered for p in ps), greedy_rows=False)
            keys = torch.tensor([seed_key(s.seed) for s, _ in sampled_plain], device=dev)
            positions = torch.tensor([[s.start_pos + len(s.token_ids)] for s, _ in sampled_plain], device=dev)
            for (s, _), tok in zip(sampled_plain, keyed_targets(probs[:, None], keys, positions)[:, 0].tolist()):
                decided[s.seq_id] = [0], [tok]
        for s, rr in zip(seqs, row_ranges):
            if rr is None or s.seq_id in decided:
                continue
            params = s.params or SamplingParams()
            seq_logits = logits[rr[0]:rr[0] + rr[1]]
            first_pos = s.start_pos + len(s.token_ids)  # position of the first token produced
            node_list = s.token_ids[-1:] + s.candidates  # (every sequence left verifies a tree)
            acc = accepted.get(s.seq_id)
            if acc is None:
                acc = accept(params.acceptance or self.spec.acceptance, tree,
                             torch.tensor(node_list, device=self.device), seq_logits,
                             params, s.seed, first_pos, self.spec.epsilon, self.spec.alpha)
            decided[s.seq_id] = acc.path, [node_list[i] for i in acc.path[1:]] + [acc.bonus]
        return decided

    def _device_tail_applies(self, batch: InputBatch) -> bool:
        """A device tail decides every sequence of the step: a uniform step, every sequence
        sampling, none with logprobs, min_tokens still masking stop tokens, penalties or logit
        bias, and — when it verifies a tree — every sampled sequence's acceptance rule one the
        sampled tail implements (``SAMPLED_RULES``; a registered rule without a batched device
        version decides on the host path, by its own function)."""
        if batch.uniform_nodes is None or not all(
                s.sample and not decides_on_host(s.params, s.num_output_tokens) for s in batch.seqs):
            return False
        return batch.tree is None or all(self._rule(s.params) in SAMPLED_RULES for s in batch.seqs
                                         if not (s.params or SamplingParams()).greedy)

    def _rule(self, params: Optional[SamplingParams]) -> str:
        """The acceptance rule a sampled sequence's tree is decided by."""
        return (params.acceptance if params is not None else None) or (self.spec.acceptance if self.spec else "greedy")

    @staticmethod
    def _tail_results(out: SchedulerOutput, tree: Optional[MedusaTree], rows: list[list[int]],
                      cands: Optional[list[list[int]]] = None) -> list[SeqResult]:
        """Results from the decided rows (``SpecTail.greedy``'s) and the proposed candidates."""
        depth = tree.depth if tree is not None else 0
        results = []
        for i, (s, r) in enumerate(zip(out.seqs, rows)):
            n = r[0]
            results.append(SeqResult(
                seq_id=s.seq_id, sampled_token_ids=r[1:1 + n] + [r[1 + depth]],
                next_candidates=cands[i] if cands is not None else [],
                num_accepted=n, accepted_per_depth=[int(n > d) for d in range(depth)]))
        return results

    @staticmethod
    def _penalize(logits: torch.Tensor, s: ScheduledSeq, params: SamplingParams, tree: Optional[MedusaTree]) -> None:
        """Penalties and logit bias, each row with its own history: row i (tree node i)
        follows the output and the candidates on node i's path."""
        n_out = s.num_output_tokens
        prompt, output = s.history[:len(s.history) - n_out], s.history[len(s.history) - n_out:]
        paths = [[]]
        if s.tree:  # node i's candidates from depth 1 down to itself (the root is already output)
            tokens = [0] + list(s.candidates)
            paths += [[tokens[j] for j in tree.node_paths[i][1:]] for i in range(1, logits.shape[0])]
        apply_penalties(logits, params, prompt, output, paths)

    def _mask_before_min_tokens(self, logits: torch.Tensor, s: ScheduledSeq, params: SamplingParams,
                                tree: Optional[MedusaTree]) -> None:
        """Below min_tokens, stop tokens (the whole EOS set and stop_token_ids) cannot be
        produced: row i produces output index n + i (tree rows: n + depth)."""
        if params.min_tokens <= s.num_output_tokens:
            return
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        if not stop_ids:
            return
        depths = tree.depths if logits.shape[0] > 1 else [0]
        for row, d in enumerate(depths[: logits.shape[0]]):
            if s.num_output_tokens + d < params.min_tokens:
                logits[row, stop_ids] = float("-inf")
