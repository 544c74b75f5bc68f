"""The public API: Engine (add_request / step / abort / generate_batch).

One step is a straight line: the scheduler decides what runs (and how much to speculate),
the executor's workers run it, the scheduler applies the tokens, the output processor turns
them into text and outputs:

    scheduler.update_draft_token_ids(...)       # executor.take_candidates(): the last step's drafts, if deferred
    out = scheduler.schedule()                  # SchedulerOutput: chunks, trees, candidates
    result = executor.execute(out, defer_candidates=True)  # StepResult: tokens (next candidates later)
    touched = scheduler.update(result, ms)      # tokens appended, stops, KV freed
    outputs = output_processor.process(touched) # text, stop strings, RequestOutputs
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from engine.attention import check_backend, select_backend
from engine.attention.kv_cache import PagedKVCache
from engine.core.adaptive import AdaptiveTrees, measure_driver_ms_per_node
from engine.core.backoff import BackoffPolicy, LatencyModel, LatencyPoint
from engine.core.block_manager import BlockManager
from engine.core.config import EngineConfig, build_engine_config
from engine.core.outputs import ScheduledSeq, SchedulerOutput, SeqResult, StepResult
from engine.core.policy import SpeculationPolicy
from engine.core.request import DecodeCounters, Request, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.core.structured import GuidanceBackend, StructuredOutputManager
from engine.executor import WorkerError
from engine.executor.uniproc import UniprocExecutor
from engine.models.config import eos_ids
from engine.models.loader import read_arch_config, resolve_model_path
from engine.models.parallel import ShardPlan
from engine.output_processor import OutputProcessor
from engine.sample.acceptance import ACCEPTANCE_RULES, check_rule
from engine.spec.tree import CutTrees, MedusaTree, SubTree, expected_accept_length
from engine.worker.worker import WorkerSpec, freeze_heap

logger = logging.getLogger("medusa_engine")

Prompt = Union[str, list[int]]


@dataclass
class EngineStats(DecodeCounters):
    num_steps: int = 0
    num_generated_tokens: int = 0
    # Back-off: engine steps per tree size (candidates per decoding sequence; 0 = plain).
    # (The speculation policy's own counter: the engine hands it this dict.)
    steps_by_tree_size: dict[int, int] = field(default_factory=dict)
    # Steps in which every sequence decoded (no prefill chunk) and their wall time: the
    # per-step cost of decoding alone, which prefill steps would otherwise blur.
    num_decode_only_steps: int = 0
    decode_only_seconds: float = 0.0
    # Steps that captured a CUDA graph: graphs are all captured at start-up and sealed, so
    # this stays 0 (the GPU tests assert it).
    num_capture_steps: int = 0
    # Steps with a part that had no graph of its shape and ran eagerly (StepResult.graph_misses).
    num_graph_miss_steps: int = 0
    # Prefix caching: tokens of admitted requests looked up, and those served from the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def decode_step_ms(self) -> float:
        return 1e3 * self.decode_only_seconds / max(1, self.num_decode_only_steps)


def _check_text(text: str, field: str) -> None:
    """Text the tokenizer can encode: valid Unicode (a lone surrogate such as "\\ud800" is not —
    the tokenizer would raise a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field}: not valid Unicode ({e.reason} at character {e.start})") from None


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return dev


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name)
    if device.type == "cpu" and dtype != torch.float32:
        # A 16-bit CPU engine is the opt-in bf16 mode: oneDNN's packed bf16 GEMMs and the
        # batch-invariant attention keep Medusa's greedy text equal to plain decoding's in it
        # (docs/architecture.md); without oneDNN's bf16 kernel nothing would.
        from engine.models.llama import cpu_bf16_gemm_available

        if dtype != torch.bfloat16:
            raise ValueError(f"dtype: {name} is not supported on a CPU (float32, or bfloat16 where oneDNN has "
                             "a bf16 GEMM: AVX-512 or AMX)")
        if not cpu_bf16_gemm_available():
            raise ValueError("dtype: bfloat16 on a CPU needs oneDNN's bf16 GEMM (AVX-512 or AMX), which this CPU "
                             "lacks; use float32")
    return dtype


def _eos_token_ids(model_path: Path, arch_eos: tuple[int, ...], tokenizer) -> list[int]:
    """Every id that ends generation: config.json's, generation_config.json's (Llama 3 lists
    its end-of-turn ids there) and the tokenizer's."""
    ids = set(arch_eos)
    gen = model_path / "generation_config.json"
    if gen.is_file():
        ids |= set(eos_ids(json.loads(gen.read_text()).get("eos_token_id")))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class Engine:
    def __init__(self, model: str = "default", speculative: Any = None, **kwargs: Any) -> None:
        self.config: EngineConfig = build_engine_config(model, speculative, **kwargs)
        mc, cc, pc = self.config.model, self.config.cache, self.config.parallel
        if self.config.speculative is not None:
            check_rule(self.config.speculative.acceptance, "speculative.acceptance")
        check_backend(mc.attention_backend)
        self.model_path = resolve_model_path(mc.model, mc.load_format)
        self.arch = read_arch_config(self.model_path)
        self.tokenizer = _load_tokenizer(self.model_path)
        # One EOS set everywhere: requests stop on it, the runner masks it below min_tokens.
        self.eos_token_ids: frozenset[int] = frozenset(_eos_token_ids(self.model_path, self.arch.eos_token_ids,
                                                                      self.tokenizer))
        tp = pc.tensor_parallel_size
        plans = [ShardPlan.build(self.arch, tp, r) for r in range(tp)]  # refuses impossible splits

        owns_ray = False
        if pc.executor == "ray":
            from engine.executor import ray_executor

            owns_ray = ray_executor.connect(pc.ray_address)
            gpus = ray_executor.cluster_gpus()
            if mc.device == "auto":
                self.device = torch.device("cuda" if gpus >= tp else "cpu")
            else:
                self.device = torch.device(mc.device)
                if self.device.type == "cuda" and gpus < tp:
                    raise ValueError(f"device: 'cuda' with tensor_parallel_size={tp}, but the Ray cluster has {gpus:g} GPUs")
        else:
            self.device = _pick_device(mc.device)
        self.dtype = _pick_dtype(mc.dtype, self.device)

        backend = select_backend(mc.attention_backend, self.device.type, str(self.dtype).removeprefix("torch."))
        block_size = cc.block_size if cc.block_size != "auto" else (64 if self.device.type == "cuda" else 16)
        if block_size % backend.block_size_multiple:
            raise ValueError(f"block_size: the {backend.name} backend's paged kernels need a multiple of "
                             f"{backend.block_size_multiple}, got {block_size}")
        # kv_cache_memory_gb is per rank; the rank holding the most KV heads sets the block count
        # (every rank has the same blocks: the driver's block manager hands out their ids).
        per_block = PagedKVCache.bytes_per_block(self.arch.num_layers, block_size,
                                                 max(p.num_kv_heads for p in plans), self.arch.head_dim, self.dtype)
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30) // per_block)
        specs = [WorkerSpec(config=self.config, model_path=str(self.model_path),
                            device="cuda" if self.device.type == "cuda" and pc.executor == "ray" else str(self.device),
                            dtype=str(self.dtype).removeprefix("torch."), attention_backend=backend.name,
                            block_size=block_size, num_blocks=num_blocks, eos_token_ids=sorted(self.eos_token_ids),
                            rank=r, world_size=tp) for r in range(tp)]
        spec = self.config.speculative
        logger.info("starting %d worker(s): %s on %s (%s)%s%s", tp, self.model_path.name, specs[0].device, specs[0].dtype,
                    f", Medusa heads {spec.heads}, tree {spec.tree if isinstance(spec.tree, str) else 'custom'}"
                    if spec else "", ", back-off: measuring the step-latency grid" if spec and spec.backoff else "")
        t0 = time.perf_counter()
        if pc.executor == "ray":
            from engine.executor.ray_executor import RayExecutor

            self.executor = RayExecutor(specs, pc.worker_timeout_s, owns_ray)
        else:
            self.executor = UniprocExecutor(specs[0])
        info = self.executor.info
        self.startup_s = time.perf_counter() - t0
        logger.info("engine ready in %.1f s (%d CUDA graphs captured in %.1f s, %.2f GiB of graph memory)",
                    self.startup_s, info.num_graphs, info.graph_capture_s, info.graph_memory_gb)
        self.head_accuracy = info.head_accuracy
        # CUDA graphs the workers captured at start-up (0: every step runs eagerly), the time
        # and device memory they took.
        self.num_graphs, self.graph_capture_s = info.num_graphs, info.graph_capture_s
        self.graph_memory_gb = info.graph_memory_gb
        # Back-off's start-up latency grid [batch size, candidates, ms] (None without back-off).
        self.step_latency = info.step_latency
        self.tree_autotune: Optional[list[dict]] = info.tree_autotune
        self.tree: Optional[MedusaTree] = MedusaTree(tuple(tuple(c) for c in info.tree)) if info.tree else None
        tree_depth = self.tree.depth if self.tree else 0
        policy = None
        self._node_children: dict[int, list[list[int]]] = {}  # tree size → each node's children (grammar masks)
        self._cut_trees: Optional[CutTrees] = None
        self._structured: Optional[StructuredOutputManager] = None  # made at the first constrained request
        self._structured_lock = threading.Lock()  # (the server checks schemas from another thread)
        if self.tree is not None:
            # The tree set the workers built (the full tree and, with back-off, its nested trees).
            subtrees = {int(n): SubTree.of(self.tree, nodes) for n, nodes in info.subtrees.items()}
            backoff = adaptive = None
            if info.step_latency is not None:
                latency = LatencyModel([LatencyPoint(int(b), int(n), ms) for b, n, ms in info.step_latency])
                if spec.adaptive:
                    # (What a verified node costs this driver's Python, priced beside the grid.)
                    driver = measure_driver_ms_per_node(self.tree.parents, self.tree.depths,
                                                        min(64, self.config.scheduler.max_num_seqs))
                    adaptive = AdaptiveTrees(self.tree.parents, self.tree.depths, latency,
                                             driver_ms_per_node=driver)
                else:
                    expected = {n: expected_accept_length(st.tree.choices, self.head_accuracy)
                                for n, st in subtrees.items()}
                    backoff = BackoffPolicy(latency, expected)
            policy = SpeculationPolicy({n: st.nodes for n, st in subtrees.items()}, backoff, adaptive)
            self._node_children = {n: st.tree.children for n, st in subtrees.items()}
            self._cut_trees = CutTrees(self.tree, [st.tree for st in subtrees.values()])  # adaptive trees
        # A request must fit the cache alone (plus a tree's lookahead), or it could never run.
        limit = mc.max_model_len or self.arch.max_position_embeddings
        capacity = num_blocks * block_size - tree_depth
        self.max_model_len = min(limit, capacity)
        if self.max_model_len < 2 or (mc.max_model_len is not None and mc.max_model_len > capacity):
            self.executor.shutdown()
            raise ValueError(f"max_model_len: {limit} tokens asked for, but the KV cache holds {capacity} for one "
                             f"request (num_blocks={num_blocks} x block_size={block_size}"
                             f"{f' - a tree depth of {tree_depth}' if tree_depth else ''}); give the cache more "
                             "memory (kv_cache_memory_gb / num_blocks) or lower max_model_len")
        if self.max_model_len < limit:
            logger.warning("max_model_len: the KV cache holds %d tokens for one request (num_blocks=%d x "
                           "block_size=%d), fewer than the model's %d: requests are limited to %d tokens",
                           capacity, num_blocks, block_size, limit, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, block_size, cc.enable_prefix_caching)
        engine_rule = spec.acceptance if spec is not None else "greedy"

        def rule_on_device(name: Optional[str]) -> bool:  # (a request's rule, None: the engine's)
            rule = ACCEPTANCE_RULES.get(name or engine_rule)
            return rule is not None and rule.device is not None

        self.scheduler = Scheduler(self.config.scheduler, self.block_manager, self.max_model_len, tree_depth, policy,
                                   rule_on_device)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler.finish)
        self.reset_stats()
        self._seed_rng = random.Random(mc.seed)
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}
        self._dead: Optional[WorkerError] = None
        freeze_heap(self.device)  # the driver's start-up objects too (with Ray, the workers froze theirs)

    def tree_children(self, seq: ScheduledSeq) -> list[list[int]]:
        """The tree a scheduled sequence verifies, as each node's children (node 0 the root):
        the tree set's ``tree_size`` tree, or its adaptive tree (``tree_nodes``)."""
        if not seq.tree_nodes:
            return self._node_children[seq.tree_size]
        return self._cut_trees.get(tuple(seq.tree_nodes)).children

    @property
    def policy(self) -> Optional[SpeculationPolicy]:
        """The scheduler's speculation policy (None without speculation); ``policy.backoff``
        is the back-off model when ``speculative.backoff`` is on."""
        return self.scheduler.policy

    @property
    def backoff(self) -> Optional[BackoffPolicy]:
        return self.policy.backoff if self.policy is not None else None

    @backoff.setter
    def backoff(self, model: BackoffPolicy) -> None:
        """Replace the back-off model (e.g. one measured elsewhere)."""
        if self.policy is None or self.policy.backoff is None:
            raise ValueError("backoff: this engine was built without speculative.backoff")
        self.policy.backoff = model

    @property
    def model(self):
        """The model (in-process executor only: with Ray it lives in the workers)."""
        if not isinstance(self.executor, UniprocExecutor):
            raise AttributeError("Engine.model: the model lives in the Ray workers (executor='ray')")
        return self.executor.worker.model

    # ---- requests ---------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
            if chat:
                return self.encode_messages([{"role": "user", "content": prompt}])
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if chat:
                raise ValueError("prompt: chat=True needs a string prompt, got token ids")
            vocab = self.arch.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}")
            return list(prompt)
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """Chat messages ({"role", "content"}) → prompt ids through the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat: this model's tokenizer has no chat template")
        if not messages:
            raise ValueError("messages: must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected {{'role': system|user|assistant|tool, 'content': str}}")
            _check_text(m["content"], f"messages[{i}].content")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but the context holds {self.max_model_len} "
                             "(prompt plus at least one generated token must fit)")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)  # compiles (cached): ValueError naming the field
        rule = params.acceptance
        if rule is not None:
            check_rule(rule, "SamplingParams.acceptance")
            if self.config.speculative is None:
                raise ValueError("SamplingParams.acceptance: set, but speculation is off for this engine")

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, chat: bool = False, cache_salt: Optional[str] = None) -> str:
        """Queue one request. ``cache_salt``: its prefix-cache blocks are shared only with
        requests of the same salt (None: the common pool). Raises ValueError (and changes
        nothing) for bad input."""
        self._check_alive()
        params = params if params is not None else SamplingParams()
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt: expected a non-empty string or None, got {cache_salt!r:.100}")
        ids = self.encode(prompt, chat)
        self._validate(ids, params)
        seq_id = next(self._ids)
        rid = request_id if request_id is not None else f"req-{seq_id}"
        if rid in self._requests:
            raise ValueError(f"request_id: {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(62)
        req = Request(request_id=rid, seq_id=seq_id, prompt_token_ids=ids, params=params, seed=seed,
                      eos_token_ids=self.eos_token_ids, detokenizer=self.output_processor.new_detokenizer(),
                      cache_salt=cache_salt)
        if params.structured_outputs is not None:
            self.structured.add(seq_id, params.structured_outputs)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort([req.seq_id])
        if self._structured is not None:
            self._structured.remove(req.seq_id)
        self._account(req)  # what it generated before the abort counts too
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step. Returns an output for every request that got tokens or finished
        (``finished`` tells which); finished requests are forgotten by the engine."""
        self._check_alive()
        started = time.perf_counter()
        if self.scheduler.awaits_draft_tokens:  # the last step's proposals, computed meanwhile
            try:
                drafts = self.executor.take_candidates()
                self.scheduler.update_draft_token_ids(drafts.candidates, drafts.confidence)
            except WorkerError as e:
                raise self._fail_all(e) from None
        queries, hits = self.scheduler.prefix_cache_queries, self.scheduler.prefix_cache_hits
        out = self.scheduler.schedule()
        self.stats.prefix_cache_queries += self.scheduler.prefix_cache_queries - queries
        self.stats.prefix_cache_hits += self.scheduler.prefix_cache_hits - hits
        if not out.seqs:
            return []
        if self._structured is not None and len(self._structured):
            # Grammar masks for every row the step's decisions read (and trees fitted to them).
            self._structured.prepare(out.seqs, self.tree_children)
        failed: list[Request] = []
        try:
            # The step's tokens come back before its proposals are done: the device proposes
            # while update() and the output processor run, and the next step pushes the
            # candidates into the scheduler before it schedules.
            result = self.executor.execute(out, defer_candidates=True)
        except WorkerError as e:
            raise self._fail_all(e) from None
        except Exception as e:  # a bug or a bad request inside the step: not the worker's death
            result, failed_ids = self._isolate_failure(out, e)
            by_seq = {r.seq_id: r for r in self._requests.values()}
            failed = [by_seq[i] for i in failed_ids]
        # What back-off learns from: the step's wall time from scheduling on. Scheduling a tree
        # step costs more host time than a plain one (cutting and shipping every sequence's
        # candidates), which the workers' execute time alone would hide. Scheduling also waits
        # for what the host's work did not hide of the previous step's proposal: a tree step's
        # cost lands in the steps that follow it, which run the same tree size but at a change.
        step_ms = 1e3 * (time.perf_counter() - started)
        touched = self.scheduler.update(result, None if failed else step_ms)
        if self._structured is not None and len(self._structured):
            self._advance_grammars(touched, failed)
        for req in failed:
            # Finished with 'error': blocks freed, reported once; the engine keeps serving.
            self.scheduler.finish(req, "error")
            if req not in touched:
                touched.append(req)
        outputs = self.output_processor.process(touched)
        for req in touched:
            if req.finished:
                self._requests.pop(req.request_id, None)
                if self._structured is not None:
                    self._structured.remove(req.seq_id)
                self._account(req)
        self.stats.num_steps += 1
        self.stats.num_capture_steps += int(result.captured)
        self.stats.num_graph_miss_steps += int(result.graph_misses > 0)
        self.stats.num_preemptions = self.scheduler.num_preemptions
        if all(len(s.token_ids) == 1 for s in out.seqs):
            self.stats.num_decode_only_steps += 1
            self.stats.decode_only_seconds += time.perf_counter() - started
        return outputs

    @property
    def structured(self) -> StructuredOutputManager:
        """The grammar state of constrained requests (built on first use: the grammar engine's
        view of the tokenizer takes about a second)."""
        with self._structured_lock:
            if self._structured is None:
                import llguidance.hf

                tok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.arch.vocab_size,
                                                   eos_token=sorted(self.eos_token_ids))
                spec = self.config.speculative
                self._structured = StructuredOutputManager(
                    GuidanceBackend(tok), prune=spec.grammar_pruning if spec is not None else False)
            return self._structured

    def _advance_grammars(self, touched: list[Request], failed: list[Request]) -> None:
        """Move each constrained request's matcher over its newly committed tokens. The masks
        allow only what the grammar does, so a refusal is a bug: that request fails alone."""
        for req in touched:
            err = self._structured.advance(req.seq_id, req.output_token_ids)
            if err is not None and not req.finished:
                logger.error("request %s: the grammar refused its output (%s)", req.request_id, err)
                failed.append(req)

    def _isolate_failure(self, out: SchedulerOutput, exc: Exception) -> tuple[StepResult, list[int]]:
        """A step raised. Run its sequences again one at a time, so that only the ones that
        fail alone fail; the others get their tokens as if nothing happened (a re-run writes
        the same K/V to the same slots and draws the same keyed samples, so it is safe).
        Returns the step's results and the seq ids that failed."""
        logger.error("engine step %d failed (%s: %s); re-running its %d sequences one by one",
                     out.step_id, type(exc).__name__, exc, len(out.seqs))
        results, failed = [], []
        for s in out.seqs:
            try:
                res = self.executor.execute(SchedulerOutput(step_id=out.step_id, seqs=[s], propose=out.propose))
                results += res.results
            except WorkerError as e:
                raise self._fail_all(e) from None
            except Exception as e:
                logger.exception("request of seq %d failed in step %d: %s", s.seq_id, out.step_id, e)
                failed.append(s.seq_id)
                results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[]))
        return StepResult(step_id=out.step_id, results=results), failed

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise WorkerError(f"engine is dead ({self._dead}); call shutdown() and build a new Engine")

    def _fail_all(self, err: WorkerError) -> WorkerError:
        """A worker failed: every in-flight request fails (its KV blocks are freed) and the
        engine refuses further work; the error names what happened."""
        failed = list(self._requests.values())
        self.scheduler.abort([r.seq_id for r in failed])
        for req in failed:
            req.finish_reason = "error"
            if self._structured is not None:
                self._structured.remove(req.seq_id)
        self._requests.clear()
        self._dead = WorkerError(f"{err}; {len(failed)} in-flight request(s) failed")
        return self._dead

    def _account(self, req: Request) -> None:
        self.stats.num_generated_tokens += len(req.output_token_ids)
        self.stats.merge(req.metrics)

    def generate_batch(self, prompts: Sequence[Prompt],
                       params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                       chat: bool = False) -> list[RequestOutput]:
        """Run the prompts to completion (alongside anything already queued); outputs in
        prompt order. Every prompt is validated before any is queued."""
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise ValueError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                encoded.append(self.encode(p, chat))
                self._validate(encoded[-1], sp)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        # Queue the token ids validated above: each prompt is tokenised once.
        rids = [self.add_request(ids, sp) for ids, sp in zip(encoded, plist)]
        pending = set(rids)
        done: dict[str, RequestOutput] = {}
        while pending:
            for o in self.step():
                if o.finished and o.request_id in pending:
                    done[o.request_id] = o
                    pending.discard(o.request_id)
        return [done[r] for r in rids]

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (the next requests find nothing cached). Only while no request
        is unfinished: False, and nothing changed, otherwise."""
        return not self.has_unfinished() and self.block_manager.reset_cache()

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        if self.policy is not None:
            self.policy.steps_by_tree_size = self.stats.steps_by_tree_size

    def shutdown(self) -> None:
        """Stop the workers (Ray: kill the actors, remove the placement group). Idempotent."""
        self.executor.shutdown()
        if self._structured is not None:
            self._structured.close()
        if self._dead is None:
            self._dead = WorkerError("the engine was shut down")
            if self.device.type == "cuda":
                gc.unfreeze()  # what freeze_heap froze (this engine's among it) can be collected again

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


