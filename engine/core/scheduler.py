"""Continuous batching: FCFS waiting queue, running set, token budget, chunked prefill,
KV reservation for speculation, preemption by recompute — and the step's speculation policy
(which tree decoding sequences verify, whether to propose for the next step).

Each step every running request gets work (its next prefill chunk, or its pending token plus
its Medusa tree), then waiting requests are admitted while the budget and KV blocks allow.
When a running request cannot get the blocks it needs, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the front of the waiting
queue to be recomputed (prompt + tokens generated so far) later — with keyed sampling it then
produces exactly the tokens it would have produced without the preemption.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Optional, Sequence

from engine.core.adaptive import ROUTE as ADAPTIVE_ROUTE
from engine.core.adaptive import Candidates
from engine.core.block_manager import BlockManager, extend_block_hashes
from engine.core.config import SchedulerConfig
from engine.core.outputs import ScheduledSeq, SchedulerOutput, StepResult
from engine.core.policy import SpeculationPolicy
from engine.core.request import Request, RequestStatus
from engine.core.sampling_params import DECISION_ROUTES, decision_route


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        tree_depth: int = 0,
        policy: Optional[SpeculationPolicy] = None,
        rule_on_device: Callable[[Optional[str]], bool] = lambda rule: True,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.max_model_len = max_model_len
        # Extra KV slots a decode step may write: one per accepted tree level.
        self.tree_depth = tree_depth
        # None: no speculation (no sequence ever has candidates).
        self.policy = policy
        # Has a request's acceptance rule (its SamplingParams.acceptance; None: the engine's) a
        # device version? Without one its tree steps decide on the host, and back-off prices
        # them so (the rule registry is the worker side's: the engine hands this in).
        self.rule_on_device = rule_on_device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_seq_id: dict[int, Request] = {}
        self._step_id = 0
        # seq_id -> (tokens computed, sampled) for the step in flight, and that step.
        self._in_flight: dict[int, tuple[int, bool, int]] = {}  # ... and candidates verified
        self._in_flight_step: Optional[SchedulerOutput] = None
        # seq_id -> (candidate indices, their tokens, their head probabilities) of the adaptive
        # trees in flight.
        self._in_flight_trees: dict[int, tuple[Sequence[int], list[int], list[float]]] = {}
        self._step_tree = 0  # the tree size the policy chose for the step in flight
        self._step_route = "greedy"  # ... and how its decodes decide (engine/sample/sampler.py decision_route)
        self._last_prefill_only = False  # the previous step left the decoding sequences out
        # The last step deferred its candidates (StepResult.candidates_deferred): the request of
        # each result (None: finished, gets none), until the driver pushes them
        # (update_draft_token_ids) before the next schedule().
        self._drafts_owed_to: Optional[list[Optional[Request]]] = None
        # Prefix caching: tokens of admitted requests, and those their cached prefix held.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.seq_id in self._by_seq_id:
            raise ValueError(f"request {request.request_id!r} is already scheduled")
        self._by_seq_id[request.seq_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq_ids: Iterable[int]) -> list[Request]:
        """Remove requests wherever they are and free their blocks. Unknown ids are ignored."""
        aborted = []
        for seq_id in seq_ids:
            req = self._by_seq_id.get(seq_id)
            if req is None:
                continue
            self.finish(req, "abort")
            aborted.append(req)
        return aborted

    def finish(self, req: Request, reason: str) -> None:
        """End a request (wherever it is) and free its blocks: an abort, or a stop that only the
        output processor can see (a stop string)."""
        if req.status is RequestStatus.FINISHED:
            req.finish_reason = reason
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.candidates, req.candidate_confidence = [], []
        self.blocks.free(req.seq_id)
        self._by_seq_id.pop(req.seq_id, None)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.seq_id)
        req.num_computed = 0
        req.candidates, req.candidate_confidence = [], []
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- one step ---------------------------------------------------------------------
    def _decoding(self) -> list[Request]:
        """Running requests whose next step is a decode (one pending token)."""
        return [r for r in self.running if r.num_tokens - r.num_computed == 1]

    def schedule(self) -> SchedulerOutput:
        """The next step. The policy picks the tree size for the number of decoding sequences
        (without one: no trees). Trees go to every decoding sequence or to none, so a step
        stays uniform (one tree size, which CUDA graphs need) — when the budget cannot hold
        them all, plain decoding of the whole batch beats trees for some and a wait or a
        plain step for the rest. With adaptive trees (``policy.adaptive``) each decoding
        sequence gets its own instead, nodes taken best-first across them by the heads'
        calibrated confidence (engine/core/adaptive.py): some get none. A step that prefills
        verifies no trees (``_prefill_due``), and new prompts get a step of their own when every
        running sequence decodes."""
        if self._in_flight_step is not None:
            raise RuntimeError("schedule() called again before update() of the previous step")
        if self._drafts_owed_to is not None:
            raise RuntimeError("schedule() before the last step's deferred candidates were pushed "
                               "(update_draft_token_ids)")
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted_before = self.num_preemptions
        decoding = self._decoding()
        # How will the step decide (the costliest of its requests' routes)? Back-off prices each
        # route on its own.
        route = max((decision_route(r.params, len(r.output_token_ids), self.rule_on_device(r.params.acceptance))
                     for r in decoding),
                   key=DECISION_ROUTES.index, default="greedy")
        prefill_due = self._prefill_due(len(decoding), budget)
        adaptive = self.policy.adaptive if self.policy is not None else None
        # Adaptive trees: each decoding sequence's own candidates (indices into the full tree's).
        nodes_of: dict[int, list[int]] = {}
        if adaptive is not None:
            # Greedy steps of adaptive trees decide in the ragged steps' graphs on the device; any
            # other decides on the host path.
            route, n = ("greedy" if route == "greedy" else ADAPTIVE_ROUTE), 0
            if decoding and not prefill_due:
                nodes_of = adaptive.plan(
                    [Candidates(r.seq_id, r.candidates, r.candidate_confidence) for r in decoding
                     if r.candidates and r.num_tokens + self.tree_depth <= self.max_model_len],
                    len(decoding), budget - len(decoding), route)
            cut = {sid: [self._by_seq_id[sid].candidates[i] for i in nodes] for sid, nodes in nodes_of.items()}
            trees = bool(cut)
        else:
            n = self.policy.tree_for(len(decoding), budget, route) if self.policy is not None else 0
            # Each decoding sequence's candidates cut down to the chosen tree, once.
            cut = {r.seq_id: self.policy.cut(n, r.candidates) for r in decoding if r.candidates} if n else {}
            tree_tokens = sum(1 + len(c) for c in cut.values())
            # Trees only when every decoding sequence has candidates: one without (its last step
            # proposed nothing — e.g. a prompt prefilled while proposals were off) would make the
            # step non-uniform, and such a step runs eagerly. Measured on an H100 (back-off, 128
            # requests in flight, each finished one replaced at once): decode steps averaged 10.7
            # ms against plain decoding's 3.5, at 0.5x its throughput.
            trees = n > 0 and len(cut) == len(decoding) and tree_tokens <= budget and not prefill_due
        # New prompts alone, decodes next step (never two such steps in a row, so a stream of
        # arrivals cannot starve the decodes): a step that carries a prompt verifies no trees,
        # the next one can. (Both replay graphs; when a step mixing prompts and decodes ran
        # eagerly, ~40 ms on an H100, this also kept such steps rare.)
        prefill_only = (bool(decoding) and len(self.running) == len(decoding) and not self._last_prefill_only
                        and self._admissible(budget))
        self._last_prefill_only = prefill_only

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            pending = req.num_tokens - req.num_computed
            if prefill_only:
                i += 1
                continue
            chunk = min(pending, budget)
            reaches_end = chunk == pending
            cands = cut.get(req.seq_id, []) if (trees and reaches_end and pending == 1) else []
            if cands and (1 + len(cands) > budget or req.num_tokens + self.tree_depth > self.max_model_len):
                cands = []  # no room for the tree this step: plain decode is still exact
            nodes = nodes_of.get(req.seq_id, []) if cands else []
            slots = req.num_computed + chunk + (self.tree_depth if cands else 0)
            while not self.blocks.allocate(req.seq_id, slots):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            out.append(self._scheduled(req, chunk, reaches_end, cands, (n or len(cands)) if cands else 0, nodes))
            budget -= chunk + len(cands)
            i += 1

        # After a preemption the cache is full: admitting now would only preempt again next step.
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and self.num_preemptions == preempted_before):
            req = self.waiting[0]
            hits, chunk = self._admission(req, budget)
            cached = len(hits) * self.blocks.block_size
            if not self.blocks.admit(req.seq_id, hits, cached + chunk):
                break
            self.waiting.popleft()
            req.num_computed = cached
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += cached
            if req.metrics.num_steps == 0:
                req.metrics.num_cached_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.append(self._scheduled(req, chunk, cached + chunk == req.num_tokens, [], 0))
            budget -= chunk

        self._step_id += 1
        step = SchedulerOutput(step_id=self._step_id, seqs=out)
        if not out:  # nothing to run (an idle engine, or a full cache): no step is in flight
            return step
        if self.policy is not None:
            # Propose for the next step's decoding sequences as a whole: this step's sampling
            # ones and the decodes a prompts-only step left out (they hold their candidates).
            next_decoding = sum(1 for s in out if s.sample) + (len(decoding) if prefill_only else 0)
            step.propose = self.policy.propose_next(next_decoding, self.config.max_num_batched_tokens, route)
            if any(s.sample and len(s.token_ids) == 1 for s in out):
                # (adaptive trees: the step's nodes recorded as the nearest measured tree size)
                recorded = n if adaptive is None else adaptive.grid_size(
                    sum(1 for s in out if s.sample and len(s.token_ids) == 1), sum(len(s.candidates) for s in out))
                self.policy.record(recorded if any(s.candidates for s in out) else 0)
        self._in_flight_step = step
        self._step_tree, self._step_route = n, route
        return step

    def _prefill_due(self, num_decoding: int, budget: int) -> bool:
        """Will this step carry a prefill chunk (a running request's next chunk or a recompute,
        or a waiting request that can be admitted)? Then its decoding sequences verify no
        trees — prefill first. A step with a prefill chunk decides on the host; trees there
        would take the budget from the chunks, and a tree beside a chunk has no graph. Measured
        on an H100 (batch 64, 63-candidate tree, benchmarks/step_trace.py): the first 31
        prompts' trees left 64 tokens a step to the other 33 prompts — 26 eager mixed steps of
        ~110 ms, 2.8 s of a 3.6 s run, where plain decoding's engine prefills in 3 steps."""
        return len(self.running) > num_decoding or self._admissible(budget - num_decoding)

    def _admissible(self, budget: int) -> bool:
        """Can the first waiting request be admitted with ``budget`` tokens left?"""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs or budget <= 0:
            return False
        req = self.waiting[0]
        hits, chunk = self._admission(req, budget)
        cached = len(hits) * self.blocks.block_size
        return self.blocks.blocks_to_admit(hits, cached + chunk) <= self.blocks.num_free_blocks

    def _admission(self, req: Request, budget: int) -> tuple[list[int], int]:
        """A waiting request's cached prefix (its blocks: computed already, by anyone) and the
        chunk it would compute after it with ``budget`` tokens."""
        hits = self._prefix_hits(req)
        return hits, min(req.num_tokens - len(hits) * self.blocks.block_size, budget)

    def _identities(self, req: Request, num_blocks: int) -> list[bytes]:
        """The identities of the request's first ``num_blocks`` full blocks (memoised on it)."""
        if len(req.block_hashes) < num_blocks:
            extend_block_hashes(req.block_hashes, req.all_token_ids, num_blocks, self.blocks.block_size,
                                req.cache_salt)
        return req.block_hashes[:num_blocks]

    def _prefix_hits(self, req: Request) -> list[int]:
        """The cached blocks of a waiting request's prefix: full blocks only, and never the
        block of its last token (that token is computed: its logits start generation)."""
        if not self.blocks.caching:
            return []
        return self.blocks.lookup(self._identities(req, (req.num_tokens - 1) // self.blocks.block_size))

    def _scheduled(self, req: Request, chunk: int, sample: bool, cands: list[int], tree: int,
                   nodes: Sequence[int] = ()) -> ScheduledSeq:
        self._in_flight[req.seq_id] = (chunk, sample, len(cands))
        if nodes:  # what the adaptive policy learns from once the step is back
            self._in_flight_trees[req.seq_id] = (nodes, cands, [req.candidate_confidence[i] for i in nodes])
        req.metrics.num_steps += 1
        start = req.num_computed
        return ScheduledSeq(
            seq_id=req.seq_id,
            token_ids=req.all_token_ids[start:start + chunk],
            start_pos=start,
            block_table=list(self.blocks.block_table(req.seq_id)),
            sample=sample,
            tree_size=tree,
            candidates=list(cands),
            params=req.params,
            seed=req.seed,
            num_output_tokens=len(req.output_token_ids),
            history=req.all_token_ids if sample and req.params.penalized else [],
            tree_nodes=list(nodes),
        )

    @property
    def awaits_draft_tokens(self) -> bool:
        """The last step deferred its candidates and a request it ran still runs: the driver
        must push them (``update_draft_token_ids``) before the next ``schedule()``."""
        return self._drafts_owed_to is not None

    def update_draft_token_ids(self, candidates: list[list[int]],
                               confidence: Optional[list[list[float]]] = None) -> None:
        """The last step's deferred candidates, one list per result in result order (the
        executor's ``take_candidates()``), and with adaptive trees their confidences, to the
        requests still running: they decide the next step's trees (vLLM's post_step →
        ``update_draft_token_ids``)."""
        if self._drafts_owed_to is None:
            raise RuntimeError("update_draft_token_ids: the last step deferred no candidates")
        reqs = self._drafts_owed_to
        if len(candidates) != len(reqs):
            raise ValueError(f"update_draft_token_ids: {len(candidates)} lists for {len(reqs)} results")
        self._drafts_owed_to = None
        for i, (req, cands) in enumerate(zip(reqs, candidates)):
            if req is not None and req.status is RequestStatus.RUNNING:
                req.candidates, req.candidate_confidence = cands, list(confidence[i]) if confidence else []

    def update(self, result: StepResult, execute_ms: Optional[float] = None) -> list[Request]:
        """Apply a step's results: advance KV accounting, append tokens (stopping exactly at the
        first stop condition that token ids decide — EOS, stop token ids, lengths — never
        overshooting), free finished requests. Stop strings are the output processor's: it
        trims and finishes requests through ``finish``. ``execute_ms``: what the step took —
        scheduling and the workers' execution (a pure decode step's cost corrects the
        speculation policy, unless the step captured a CUDA graph). A result with
        ``candidates_deferred`` leaves them owed (``awaits_draft_tokens``) when a request it ran
        still runs.
        Returns the requests that received tokens or finished this step."""
        step = self._in_flight_step
        if step is None:
            raise RuntimeError("update() without a scheduled step")
        touched = []
        verified = []  # adaptive trees: what each verified and produced
        deferred_to: list[Optional[Request]] = []  # per result, the request its candidates go to
        for res in result.results:
            chunk, sampled, verified_nodes = self._in_flight.pop(res.seq_id)
            req = self._by_seq_id.get(res.seq_id)
            deferred_to.append(req if sampled else None)
            if req is None:
                continue
            req.num_computed += chunk
            if not sampled:
                self._register_blocks(req)
                continue
            # The accepted candidates' K/V were committed to the cache by the runner.
            req.num_computed += res.num_accepted
            was_decode = chunk == 1 and req.output_token_ids
            if was_decode:
                req.metrics.record_decode(res.num_accepted, res.accepted_per_depth, verified_nodes)
            reason = None
            for j, tok in enumerate(res.sampled_token_ids):
                req.output_token_ids.append(tok)
                if res.logprobs:
                    req.output_logprobs.append(res.logprobs[j])
                if res.top_logprobs:
                    req.output_top_logprobs.append(res.top_logprobs[j])
                reason = req.token_stop_reason(self.max_model_len)
                if reason:
                    break
            req.candidates = list(res.next_candidates)
            req.candidate_confidence = list(res.next_confidence)
            if res.seq_id in self._in_flight_trees:
                nodes, cands, probs = self._in_flight_trees[res.seq_id]
                verified.append((nodes, cands, probs, res.sampled_token_ids))
            touched.append(req)
            self._register_blocks(req)
            if reason:
                self.finish(req, reason)
        self._in_flight.clear()
        self._in_flight_trees.clear()
        self._in_flight_step = None
        if verified and self.policy is not None and self.policy.adaptive is not None:
            self.policy.adaptive.observe_step(verified)
        if result.candidates_deferred and any(r is not None and r.status is RequestStatus.RUNNING
                                              for r in deferred_to):
            self._drafts_owed_to = deferred_to
        if execute_ms is not None and not result.captured:
            self._observe(step, result, execute_ms)
        return touched

    def _register_blocks(self, req: Request) -> None:
        """Cache the request's blocks that are full of committed tokens. Committed: computed
        and final, never past the request's last token but one — a plain step computes up to
        there, and so does a Medusa step however many candidates it accepted (a stop token
        can end the output inside them), so the cache holds the same blocks with speculation
        on or off."""
        if self.blocks.caching:
            full = min(req.num_computed, req.num_tokens - 1) // self.blocks.block_size
            if full > self.blocks.num_registered(req.seq_id):  # (most steps fill no block: nothing to hash)
                self.blocks.register(req.seq_id, self._identities(req, full))

    def _observe(self, step: SchedulerOutput, result: StepResult, execute_ms: float) -> None:
        """A pure decode step, every sequence verifying the tree the policy chose (or none, with
        no proposals when it chose none): what it cost and yielded corrects the policy."""
        n = self._step_tree
        if self.policy is None or not step.seqs:
            return
        if self.policy.adaptive is not None:  # priced by the step's tree nodes in all
            if all(s.sample and len(s.token_ids) == 1 for s in step.seqs):
                self.policy.adaptive.observe_latency(len(step.seqs), sum(len(s.candidates) for s in step.seqs),
                                                     execute_ms, self._step_route)
            return
        if step.propose != (n > 0):
            return
        if all(s.sample and len(s.token_ids) == 1 and len(s.candidates) == n for s in step.seqs):
            made = [len(r.sampled_token_ids) for r in result.results]
            self.policy.observe(len(made), n, execute_ms, sum(made) / len(made), self._step_route)
