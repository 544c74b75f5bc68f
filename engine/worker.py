"""Worker: everything that holds tensors for one tensor-parallel rank.

The driver (Engine) owns the tokenizer, the scheduler and the block manager; a worker owns the
model shard, its paged KV cache, the attention backend, the Medusa proposer and the
ModelRunner. The uniproc executor runs one worker in the engine's process; the Ray executor
runs one per rank in Ray actors. What a worker needs arrives as a WorkerSpec (msgspec, so it
crosses process boundaries as it is) and it reports back a WorkerInfo.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import msgspec
import torch

from engine.attention import ATTENTION_BACKENDS
from engine.config import EngineConfig
from engine.cuda_graphs import padded_batch
from engine.kv_cache import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model, read_arch_config
from engine.parallel import ShardPlan, TPGroup
from engine.sampling import SamplingParams
from scheduler.outputs import ScheduledSeq, SchedulerOutput, StepResult
from spec_decode.heads import BUNDLED_HEADS_DIR
from spec_decode.tree import AUTO_TREE_SIZES, MedusaTree, build_tree_from_accuracy, expected_accept_length, nested_subtrees

logger = logging.getLogger("medusa_engine")


class WorkerSpec(msgspec.Struct, kw_only=True):
    config: EngineConfig
    model_path: str
    device: str  # resolved by the driver: "cpu", "cuda", "cuda:1"
    dtype: str  # torch dtype name
    attention_backend: str  # resolved: "torch" or "xformers"
    block_size: int
    num_blocks: int  # the same on every rank: the driver's block manager hands out its ids
    eos_token_ids: list[int]
    rank: int = 0
    world_size: int = 1


class WorkerInfo(msgspec.Struct, kw_only=True):
    tree: Optional[list[list[int]]]  # the full tree in use (after tree="auto"), None without Medusa
    # The tree set: candidate count → indices of that tree's candidates among the full tree's
    # (the full tree, and with back-off the smaller trees nested in it).
    subtrees: Optional[dict[int, list[int]]]
    head_accuracy: Optional[list[list[float]]]
    tree_autotune: Optional[list[dict]]
    pid: int
    # Back-off's latency model: [batch size, candidates per sequence, ms] on this device.
    step_latency: Optional[list[list[float]]] = None
    # CUDA graphs captured at start-up (0 when eager; forwards, tails and row-wise work), the
    # seconds it took and the device memory they hold (GiB).
    num_graphs: int = 0
    graph_capture_s: float = 0.0
    graph_memory_gb: float = 0.0


def freeze_heap(device: torch.device) -> None:
    """After start-up on a GPU: collect, then move every object alive (the model, the compiled
    functions, the graphs — objects that live as long as the engine) to the collector's
    permanent generation. A full collection otherwise walks them all, mid-step, whenever
    enough new objects have piled up: a pause of tens of ms in a step that costs a few. vLLM
    does the same after its warm-up (``freeze_gc_heap``). Objects made later (requests, their
    outputs) are collected as usual, and ``Engine.shutdown`` unfreezes. Not on the CPU, where
    a step costs tens of ms anyway and a process (the test suite) makes many engines without
    shutting them down: frozen cyclic garbage is never freed."""
    if device.type != "cuda":
        return
    gc.collect()
    gc.freeze()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        cfg = spec.config
        self.device, self.dtype = torch.device(spec.device), getattr(torch, spec.dtype)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        arch = read_arch_config(Path(spec.model_path))
        self.plan = ShardPlan.build(arch, spec.world_size, spec.rank)
        self.tp = TPGroup(self.plan)
        self.model, self.arch = load_model(Path(spec.model_path), self.dtype, self.device,
                                           spec.world_size, spec.rank, self.tp, cfg.model.load_format, cfg.model.seed)
        proposer, self.head_accuracy = build_proposer(cfg, self.model, self.arch, self.device, self.dtype)
        use_graphs = use_cuda_graphs(cfg, self.device, spec.attention_backend, spec.world_size)
        sc = cfg.scheduler
        # Beyond the driver's blocks: the pad block and, when speculating, the scratch region
        # for the step's tree nodes (a step's tokens, padded to a graph's batch bucket).
        scratch = 0
        if proposer is not None:  # any tree tree="auto" or back-off may pick, up to the full one
            scratch = max([sc.max_num_batched_tokens] + [
                (padded_batch(min(sc.max_num_seqs, sc.max_num_batched_tokens // n)) or 0) * n
                for n in range(2, proposer.tree.num_nodes + 1)])
        self.kv_cache = PagedKVCache(self.arch.num_layers, spec.num_blocks, spec.block_size, self.plan.num_kv_heads,
                                     self.arch.head_dim, self.dtype, self.device, scratch_tokens=scratch)
        backend = ATTENTION_BACKENDS[spec.attention_backend].build(self.kv_cache, self.device)
        graphs = None
        if use_graphs:
            from engine.cuda_graphs import PREFILL_GRAPH_PADDING, CudaGraphRunner

            longest = min(cfg.model.max_model_len or self.arch.max_position_embeddings,
                          spec.num_blocks * spec.block_size)
            width = min(spec.num_blocks, -(-(longest + 64) // spec.block_size))  # + a tree's lookahead
            graphs = CudaGraphRunner(self.model, backend, self.device, width, pad_block=self.kv_cache.pad_block,
                                     max_prefill_tokens=PREFILL_GRAPH_PADDING * sc.max_num_batched_tokens,
                                     max_mixed_tokens=sc.max_num_batched_tokens, max_seqs=sc.max_num_seqs)
        self.runner = ModelRunner(self.model, backend, self.device, tuple(spec.eos_token_ids), proposer,
                                  cfg.speculative, graphs)
        self.tree_autotune: Optional[list[dict]] = None
        self.step_latency: Optional[list[list[float]]] = None
        self.subtrees: Optional[dict[int, list[int]]] = None
        if proposer is not None and cfg.speculative.backoff:
            # Back-off picks a tree size per step from a latency grid measured here.
            if self.head_accuracy is None:
                raise ValueError("speculative.backoff: needs heads with a tree.json holding rank_accuracy "
                                 "(written by train-heads) to know what each tree size is worth")
            nested = nested_subtrees(self.runner.tree, self.head_accuracy, AUTO_TREE_SIZES)
            self.runner.set_trees({n: st.tree for n, st in nested.items()})
            self.subtrees = {n: list(st.nodes) for n, st in nested.items()}
            batch_sizes = sorted({min(2 ** i, sc.max_num_seqs) for i in range(16)})
            key = latency_cache_key(spec, self.device, sorted(nested), batch_sizes, self.runner.tree, use_graphs)
            self.step_latency = self._cached_timings(
                key, f"back-off step-latency grid ({len(batch_sizes)} batch sizes x {len(nested) + 1} tree sizes)",
                lambda cached: cached if cached is not None else measure_step_latency(
                    self.runner, batch_sizes, sorted(nested), spec.block_size, spec.num_blocks,
                    sc.max_num_batched_tokens, self.tp))
        elif proposer is not None and cfg.speculative.tree == "auto":
            # tree="auto": time the verify step for several tree sizes on this device, keep the best
            # (from cached timings a restart only re-picks).
            batches = sorted({min(b, sc.max_num_seqs) for b in AUTOTUNE_BATCH_SIZES})
            key = {**latency_cache_key(spec, self.device, list(AUTO_TREE_SIZES), batches, self.runner.tree,
                                       use_graphs), "what": "tree-auto"}
            self.tree_autotune = self._cached_timings(
                key, f"tree=auto step timings ({len(AUTO_TREE_SIZES)} tree sizes)",
                lambda cached: autotune_tree(self.runner, self.head_accuracy, spec.block_size, spec.num_blocks,
                                             sc.max_num_batched_tokens, sc.max_num_seqs, self.tp, timed_rows=cached))
        if proposer is not None and self.subtrees is None:
            full = self.runner.tree
            self.subtrees = {full.num_nodes - 1: list(range(full.num_nodes - 1))}
        self.graph_memory_gb = 0.0
        if graphs is not None:
            # Every graph a served step can replay, before the first request: each tree a step
            # may verify and plain decoding at every batch bucket with their tails, prompts and
            # mixed steps. Then the runner is sealed: a served step never captures.
            free = (lambda: torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else (lambda: 0)
            free_before = free()
            graphs.capture([None] + sorted(self.runner.trees.values(), key=lambda t: t.num_nodes),
                           sc.max_num_seqs, sc.max_num_batched_tokens)
            self.runner.capture_tails(sc.max_num_seqs)
            graphs.capture_prefill(sc.max_num_batched_tokens)
            graphs.capture_mixed()
            graphs.seal()
            self.graph_memory_gb = max(0.0, (free_before - free()) / 2 ** 30)
        freeze_heap(self.device)

    def _cached_timings(self, key: dict, what: str, measure: Callable[[Optional[list]], list]) -> list:
        """Start-up timings kept on disk under ``key``: ``measure(cached)`` gets what an earlier
        start stored (None: nothing, or MEDUSA_ENGINE_REMEASURE=1) and returns the timings, which
        are stored when they were measured. Rank 0 decides (load or measure) for every rank: the
        measurement's steps are collective."""
        cached = self.tp.broadcast_object(load_timings(key) if self.spec.rank == 0 else None)
        if cached is not None:
            logger.info("%s: loaded from the cache", what)
            return measure(cached)
        logger.info("%s: measuring; cached for the next start", what)
        t0 = time.perf_counter()
        timings = measure(None)
        logger.info("%s: measured in %.1f s", what, time.perf_counter() - t0)
        if self.spec.rank == 0:
            save_timings(key, timings)
        return timings

    def info(self) -> WorkerInfo:
        tree, g = self.runner.tree, self.runner.graphs
        return WorkerInfo(tree=[list(c) for c in tree.choices] if tree else None, subtrees=self.subtrees,
                          head_accuracy=self.head_accuracy,
                          tree_autotune=self.tree_autotune, pid=os.getpid(), step_latency=self.step_latency,
                          num_graphs=g.num_graphs if g else 0, graph_capture_s=round(g.capture_seconds, 2) if g else 0.0,
                          graph_memory_gb=round(self.graph_memory_gb, 3))

    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        return self.runner.execute(out, defer_candidates)

    def take_candidates(self) -> list[list[int]]:
        return self.runner.take_candidates()


def latency_cache_key(spec: WorkerSpec, device: torch.device, sizes: list[int], batch_sizes: list[int],
                      tree, graphs: bool) -> dict:
    """What measured step timings (back-off's grid, tree=auto's) depend on: the device, the
    software, the model and heads (by their files' sizes and times), the tree set and the step
    shapes."""
    cfg = spec.config

    def files(path) -> list:
        p = Path(path)
        if not p.is_dir():
            return [str(path)]
        return sorted([f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in p.iterdir()
                      if f.suffix in (".json", ".safetensors", ".pt", ".bin"))

    heads = cfg.speculative.heads
    heads_dir = BUNDLED_HEADS_DIR if heads == "default" else heads
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}",
            "torch": torch.__version__, "dtype": spec.dtype, "backend": spec.attention_backend, "graphs": graphs,
            "model": [spec.model_path, files(spec.model_path)], "heads": [str(heads_dir), files(heads_dir)],
            "proposal_vocab": cfg.speculative.proposal_vocab, "tree": [list(c) for c in tree.choices],
            "sizes": sizes, "batch_sizes": batch_sizes, "block_size": spec.block_size,
            "token_budget": cfg.scheduler.max_num_batched_tokens, "world_size": spec.world_size,
            "version": LATENCY_CACHE_VERSION}


# Bump when what a grid point measures changes (the cache then re-measures everywhere).
LATENCY_CACHE_VERSION = 1


def _latency_cache_file(key: dict) -> Path:
    from engine.models.loader import cache_dir

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "step-latency" / f"{digest}.json"


def load_timings(key: dict) -> Optional[list]:
    """Timings measured before under the same key; None if there are none (or
    MEDUSA_ENGINE_REMEASURE=1 asks for a fresh measurement)."""
    if os.environ.get("MEDUSA_ENGINE_REMEASURE") == "1":
        return None
    f = _latency_cache_file(key)
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data["grid"] if data.get("key") == key else None


def save_timings(key: dict, timings: list) -> None:
    f = _latency_cache_file(key)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".part")
        tmp.write_text(json.dumps({"key": key, "grid": timings, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}))
        os.replace(tmp, f)
    except OSError as e:  # a read-only cache only costs the next start a measurement
        logger.warning("could not cache the step timings in %s (%s)", f, e)


def use_cuda_graphs(config: EngineConfig, device: torch.device, backend: str, world_size: int) -> bool:
    """Graphs need a backend whose metadata refreshes in place (it declares ``cuda_graphs``) on
    CUDA. Under tensor parallelism steps stay eager: capturing the NCCL all-reduces is not
    validated here."""
    return (not config.model.enforce_eager and device.type == "cuda" and ATTENTION_BACKENDS[backend].cuda_graphs
            and world_size == 1)


def build_proposer(config: EngineConfig, model, arch, device, dtype):
    from spec_decode.heads import MedusaHeads
    from spec_decode.proposer import MedusaProposer, read_proposal_vocab

    spec = config.speculative
    if spec is None:
        return None, None
    path = None
    if spec.heads == "random":
        heads = MedusaHeads(spec.num_heads, 1, arch.hidden_size, arch.vocab_size).randomize(config.model.seed)
    else:
        path = BUNDLED_HEADS_DIR if spec.heads == "default" else Path(spec.heads)
        if spec.heads == "default" and config.model.model != "default":
            raise ValueError("speculative.heads: 'default' heads belong to the bundled model; "
                             "pass a heads directory or 'random' for other models")
        if not path.is_dir():
            raise ValueError(f"speculative.heads: {str(path)!r} is not a directory")
        heads = MedusaHeads.load(path, arch.hidden_size, arch.vocab_size)
    acc = None
    if path is not None and (path / "tree.json").is_file():
        acc = json.loads((path / "tree.json").read_text()).get("rank_accuracy")
    if spec.tree == "auto":
        if acc is None:
            raise ValueError("speculative.tree: 'auto' needs heads with a tree.json holding rank_accuracy "
                             "(written by train-heads)")
        tree = build_tree_from_accuracy(acc, AUTO_TREE_SIZES[-1])
    else:
        tree = MedusaTree.build(spec.tree, heads.num_heads)
    vocab = read_proposal_vocab(path, arch.vocab_size) if path is not None and spec.proposal_vocab == "heads" else None
    # The heads' ResBlocks are replicated on every rank; shared heads project through the
    # base lm_head, which is vocab-parallel like the model's (a proposal vocabulary's rows are
    # gathered once).
    return MedusaProposer(heads.to(device=device, dtype=dtype).eval(), tree, model.lm_head, model.embed, vocab,
                          embed_table=model.embed_table()), acc


def _median_step_seconds(runner: ModelRunner, out: SchedulerOutput) -> float:
    """Wall time of ``runner.execute(out)``: one warm-up run, then the median of three."""
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(4):
        sync()
        t0 = time.perf_counter()
        runner.execute(out)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[1]


# Batch sizes tree="auto" times: one fixed tree serves every step, so it is chosen for the small
# batches where a fixed tree pays (back-off sizes the tree per step for the rest). On a CPU the
# verify step's cost grows with batch x nodes (it is compute-bound), so batch 1 alone picked
# trees too large for the README demo's batch of 4 (0.82x plain there).
AUTOTUNE_BATCH_SIZES = (1, 4)


def autotune_tree(runner: ModelRunner, acc, block_size: int, num_blocks: int, token_budget: int,
                  max_num_seqs: int, tp: TPGroup, ctx: int = 128,
                  timed_rows: Optional[list[dict]] = None) -> list[dict]:
    """Time plain decoding and one verify step per tree size (``ctx`` tokens of context) at
    batch 1 and 4; keep the tree with the best estimated speed-up (expected tokens per step x
    plain step time / verify step time, averaged over the batch sizes). Runs before any
    request exists, so the KV blocks it scribbles on are free. Under tensor parallelism every
    rank times the same steps (they run in lockstep) and rank 0's choice is broadcast, so all
    ranks agree. ``timed_rows``: this function's rows from an earlier start (cached), whose
    timings are used instead of measuring."""
    trees = {n: build_tree_from_accuracy(acc, n) for n in AUTO_TREE_SIZES}
    batches = sorted({min(b, max_num_seqs) for b in AUTOTUNE_BATCH_SIZES})
    ms: dict[tuple[int, int], float] = {}
    for row in timed_rows or []:
        ms.update({(int(b), row["nodes"]): t for b, t in row["latency_ms"].items()})
        ms.update({(int(b), 0): t for b, t in row["plain_ms"].items()})
    if timed_rows is None:
        for n, tree in trees.items():
            # Each tree alone, so its step proposes for that tree only (as it will when chosen).
            runner.set_trees({n: tree})
            grid = measure_step_latency(runner, batches, [n], block_size, num_blocks, token_budget, tp, ctx,
                                        plain=not ms)
            ms.update({(int(b), int(k)): t for b, k, t in grid})
    rows = []
    for n, tree in trees.items():
        expected = expected_accept_length(tree.choices, acc)
        timed = [b for b in batches if (b, n) in ms]
        if not timed:
            continue
        speedup = {b: expected * ms[(b, 0)] / ms[(b, n)] for b in timed}
        rows.append({"nodes": n, "latency_ms": {str(b): ms[(b, n)] for b in timed},
                     "plain_ms": {str(b): ms[(b, 0)] for b in timed},
                     "expected_tokens_per_step": round(expected, 3),
                     "est_speedup": round(sum(speedup.values()) / len(speedup), 3)})
    best = tp.broadcast_object(max(rows, key=lambda r: r["est_speedup"])["nodes"])
    runner.set_trees({best: trees[best]})
    return tp.broadcast_object(rows)


def measure_step_latency(runner: ModelRunner, batch_sizes: list[int], sizes: list[int], block_size: int,
                         num_blocks: int, token_budget: int, tp: TPGroup, ctx: int = 128,
                         plain: bool = True) -> list[list[float]]:
    """[batch size, candidates, ms] for decode steps of B sequences verifying n-candidate trees
    (n = 0: plain decoding, no proposals; unless ``plain`` is False), ``ctx`` tokens of context each; combinations over the
    step token budget are skipped (the scheduler never runs them). Before any request exists,
    so the blocks it writes are free; all sequences share one block table. Under TP rank 0's
    table is broadcast, so every rank holds the same model."""
    depth = runner.tree.depth
    ctx = max(1, min(ctx, num_blocks * block_size - depth - 2))
    table = list(range(-(-(ctx + 1 + depth) // block_size)))
    greedy = SamplingParams(temperature=0)
    rows = []
    for n in [0] * plain + [s for s in sizes if s > 0]:
        for b in batch_sizes:
            if b * (n + 1) > token_budget:
                continue
            seqs = [ScheduledSeq(seq_id=i, token_ids=[1], start_pos=ctx, block_table=table, sample=True,
                                 tree=n, candidates=[1] * n, params=greedy) for i in range(b)]
            out = SchedulerOutput(step_id=-1, seqs=seqs, propose=n > 0)
            rows.append([b, n, round(1e3 * _median_step_seconds(runner, out), 4)])
    return tp.broadcast_object(rows)
