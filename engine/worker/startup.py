"""Start-up timings: what tree="auto" and back-off measure on this device before the first
request, and the on-disk cache that lets a restart skip the measurement.

- back-off: a latency grid (batch size x tree size → step ms, ``measure_step_latency``) that
  its policy reads every step;
- tree="auto": one verify step per tree size at small batches (``autotune_tree``), keeping the
  tree with the best estimated speed-up.

Both run real steps through the runner before any request exists (the KV blocks they write are
free) and are cached under a key of everything they depend on (``latency_cache_key``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from engine.core.outputs import ScheduledSeq, SchedulerOutput
from engine.core.sampling_params import SamplingParams
from engine.core.shapes import cdiv
from engine.models.parallel import TPGroup
from engine.spec.heads import BUNDLED_HEADS_DIR
from engine.spec.tree import AUTO_TREE_SIZES, build_tree_from_accuracy, expected_accept_length, nested_subtrees
from engine.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from engine.worker.worker import WorkerSpec

logger = logging.getLogger("medusa_engine")


def choose_trees(runner: ModelRunner, spec: "WorkerSpec", head_accuracy, tp: TPGroup, graphs: bool
                 ) -> tuple[Optional[list[dict]], Optional[list[list[float]]], dict[int, list[int]]]:
    """Set the runner's tree set for the engine's speculation: with back-off the full tree and
    the trees nested in it, with the latency grid; with tree="auto" the tree its timings pick;
    else the full tree alone. Returns (tree=auto's rows, back-off's grid, the tree set as
    candidate count → indices of that tree's candidates among the full tree's)."""
    cfg, sc = spec.config, spec.config.scheduler
    device = runner.device

    def recheck(plain_ms: Callable[[list], Optional[float]]) -> Optional[Callable[[list], bool]]:
        """On a CPU: whether cached timings (their plain step at batch 1) still hold."""
        if device.type != "cpu":
            return None
        return lambda cached: plain_step_agrees(runner, plain_ms(cached), spec.block_size, spec.num_blocks)
    if cfg.speculative.backoff or cfg.speculative.adaptive:
        # (Adaptive trees price steps with the same grid; they learn what nodes are worth
        # from the heads' probabilities and served steps, not from tree.json.)
        if head_accuracy is None and cfg.speculative.backoff:
            raise ValueError("speculative.backoff: needs heads with a tree.json holding rank_accuracy "
                             "(written by train-heads) to know what each tree size is worth")
        nested = nested_subtrees(runner.tree, head_accuracy, AUTO_TREE_SIZES)
        runner.set_trees({n: st.tree for n, st in nested.items()})
        batch_sizes = sorted({min(2 ** i, sc.max_num_seqs) for i in range(16)})
        key = latency_cache_key(spec, device, sorted(nested), batch_sizes, runner.tree, graphs)
        grid = cached_timings(
            key, f"back-off step-latency grid ({len(batch_sizes)} batch sizes x {len(nested) + 1} tree sizes)",
            lambda cached: cached if cached is not None else measure_step_latency(
                runner, batch_sizes, sorted(nested), spec.block_size, spec.num_blocks, sc.max_num_batched_tokens, tp),
            tp, spec.rank, recheck(lambda g: next((ms for b, n, ms in g if b == 1 and n == 0), None)))
        return None, grid, {n: list(st.nodes) for n, st in nested.items()}
    rows = None
    if cfg.speculative.tree == "auto":
        batches = sorted({min(b, sc.max_num_seqs) for b in AUTOTUNE_BATCH_SIZES})
        key = {**latency_cache_key(spec, device, list(AUTO_TREE_SIZES), batches, runner.tree, graphs),
               "what": "tree-auto"}
        rows = cached_timings(
            key, f"tree=auto step timings ({len(AUTO_TREE_SIZES)} tree sizes)",
            lambda cached: autotune_tree(runner, head_accuracy, spec.block_size, spec.num_blocks,
                                         sc.max_num_batched_tokens, sc.max_num_seqs, tp, timed_rows=cached),
            tp, spec.rank, recheck(lambda rows: rows[0]["plain_ms"].get("1") if rows else None))
    full = runner.tree
    return rows, None, {full.num_nodes - 1: list(range(full.num_nodes - 1))}


def cached_timings(key: dict, what: str, measure: Callable[[Optional[list]], list], tp: TPGroup, rank: int,
                   still_true: Optional[Callable[[list], bool]] = None) -> list:
    """Start-up timings kept on disk under ``key``: ``measure(cached)`` gets what an earlier
    start stored (None: nothing, MEDUSA_ENGINE_REMEASURE=1, or ``still_true(cached)`` said no)
    and returns the timings, which are stored when they were measured. Rank 0 decides (load,
    check or measure) for every rank: the measurement's steps are collective, and so are the
    check's."""
    cached = tp.broadcast_object(load_timings(key) if rank == 0 else None)
    if cached is not None and still_true is not None and not tp.broadcast_object(still_true(cached)):
        logger.info("%s: the cached timings no longer match this machine; measuring again", what)
        cached = None
    if cached is not None:
        logger.info("%s: loaded from the cache", what)
        return measure(cached)
    logger.info("%s: measuring; cached for the next start", what)
    t0 = time.perf_counter()
    timings = measure(None)
    logger.info("%s: measured in %.1f s", what, time.perf_counter() - t0)
    if rank == 0:
        save_timings(key, timings)
    return timings


# On a CPU a cached grid is checked at every start against one freshly timed plain step at
# batch 1 (a few steps: ~0.1 s on the bundled model) and measured again when the two differ by
# more than this share: a CPU's step times move with its load when they were measured and with
# the engine's code, which the cache key does not name, and a stale grid picks trees that lose.
CPU_RECHECK_TOLERANCE = 0.15


def plain_step_agrees(runner: ModelRunner, cached_ms: Optional[float], block_size: int, num_blocks: int,
                      ctx: int = 128) -> bool:
    """Whether a plain decode step at batch 1 (``ctx`` tokens of context, the grids' own step)
    still takes the cached time, within ``CPU_RECHECK_TOLERANCE`` (median of three after a
    warm-up)."""
    if cached_ms is None:
        return False
    ctx, table = timing_context(runner.tree.depth, ctx, block_size, num_blocks)
    now = 1e3 * _median_step_seconds(runner, decode_step(1, 0, ctx, table))
    agrees = abs(now - cached_ms) <= CPU_RECHECK_TOLERANCE * cached_ms
    logger.info("cached plain step at batch 1: %.1f ms, now %.1f ms%s", cached_ms, now, "" if agrees else " (stale)")
    return agrees


def latency_cache_key(spec: "WorkerSpec", device: torch.device, sizes: list[int], batch_sizes: list[int],
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
            "proposal_vocab": cfg.speculative.proposal_vocab, "adaptive": cfg.speculative.adaptive,
            "tree": [list(c) for c in tree.choices],
            "sizes": sizes, "batch_sizes": batch_sizes, "block_size": spec.block_size,
            "token_budget": cfg.scheduler.max_num_batched_tokens, "world_size": spec.world_size,
            "version": LATENCY_CACHE_VERSION}


# Bump when what a grid point measures changes, or how (the cache then re-measures everywhere).
# 2: tree=auto in interleaved rounds; CPU GEMMs through blocked weights. 3: adaptive trees timed
# as ragged steps (their graphs on a GPU), not as the tree set's uniform ones. 4: inversions measured
# again and capped (measure_step_latency).
LATENCY_CACHE_VERSION = 4


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


def _median_step_seconds(runner: ModelRunner, out: SchedulerOutput) -> float:
    """Wall time of ``runner.execute(out)``: one warm-up run, then the median of three."""
    times = []
    for i in range(4):
        t = _step_seconds(runner, out)
        if i:
            times.append(t)
    return sorted(times)[1]


def _step_seconds(runner: ModelRunner, out: SchedulerOutput) -> float:
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    runner.execute(out)
    sync()
    return time.perf_counter() - t0


def timing_context(depth: int, ctx: int, block_size: int, num_blocks: int) -> tuple[int, list[int]]:
    """The context a timed step's sequences share (``ctx`` tokens, fewer if the cache is
    smaller) and their one block table, room left for a tree of ``depth``."""
    ctx = max(1, min(ctx, num_blocks * block_size - depth - 2))
    return ctx, list(range(cdiv(ctx + 1 + depth, block_size)))


def decode_step(b: int, n: int, ctx: int, table: list[int], adaptive: bool = False) -> SchedulerOutput:
    """A step of ``b`` sequences at ``ctx`` tokens of context verifying ``n``-candidate trees
    (``adaptive``: as adaptive trees — the full tree's first n candidates, closed under parents
    since nodes are ordered by depth — which run as a ragged step)."""
    nodes = list(range(n)) if adaptive else []
    seqs = [ScheduledSeq(seq_id=i, token_ids=[1], start_pos=ctx, block_table=table, sample=True,
                         tree_size=n, candidates=[1] * n, params=SamplingParams(temperature=0), tree_nodes=nodes)
            for i in range(b)]
    return SchedulerOutput(step_id=-1, seqs=seqs, propose=n > 0)


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
        ms.update(_interleaved_ms(runner, trees, batches, block_size, num_blocks, token_budget, tp, ctx))
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


# tree="auto" times every configuration in rounds — plain and each tree size once per round —
# and keeps each one's median: a busy second on a shared CPU slows one round of every
# configuration instead of all the runs of one (which could pick a tree that loses).
AUTOTUNE_ROUNDS = 3


def _interleaved_ms(runner: ModelRunner, trees: dict, batches: list[int], block_size: int, num_blocks: int,
                    token_budget: int, tp: TPGroup, ctx: int) -> dict[tuple[int, int], float]:
    """(batch, candidates) → median ms of a decode step (0 candidates: plain), the
    configurations taking turns for ``AUTOTUNE_ROUNDS`` rounds after one warm-up each."""
    ctx, table = timing_context(max(t.depth for t in trees.values()), ctx, block_size, num_blocks)
    steps = {(b, n): decode_step(b, n, ctx, table) for n in [0, *trees] for b in batches
             if b * (n + 1) <= token_budget}

    def run(b: int, n: int) -> float:
        if n:  # each tree alone, so its step proposes for that tree only (as it will when chosen)
            runner.set_trees({n: trees[n]})
        return _step_seconds(runner, steps[(b, n)])

    for key in steps:
        run(*key)
    times: dict[tuple[int, int], list[float]] = {key: [] for key in steps}
    for _ in range(AUTOTUNE_ROUNDS):
        for key in steps:
            times[key].append(run(*key))
    ms = {key: round(1e3 * sorted(t)[len(t) // 2], 4) for key, t in times.items()}
    return {tuple(k): v for k, v in tp.broadcast_object(sorted(ms.items()))}


# A step of more candidates (at one batch size) does at least the work of one of fewer: a grid
# point measured costlier than the next larger tree's by more than this share is noise or a
# stall (an H100's batch-16 grid once had a 1-node ragged step at 1.61 ms against 1.54 for 2
# nodes, docs/performance.md), so both are measured again, once.
GRID_INVERSION_TOLERANCE = 0.03


def measure_step_latency(runner: ModelRunner, batch_sizes: list[int], sizes: list[int], block_size: int,
                         num_blocks: int, token_budget: int, tp: TPGroup, ctx: int = 128,
                         plain: bool = True) -> list[list[float]]:
    """[batch size, candidates, ms] for decode steps of B sequences verifying n-candidate trees
    (n = 0: plain decoding, no proposals; unless ``plain`` is False), ``ctx`` tokens of context
    each; combinations over the step token budget are skipped (the scheduler never runs them).
    Before any request exists, so the blocks it writes are free; all sequences share one block
    table. Points costlier than a larger tree's at the same batch size are measured again
    (``GRID_INVERSION_TOLERANCE``), then each is capped at the next larger tree's: the grid
    never prices a smaller tree above a larger one. Under TP rank 0's timings decide what is
    measured again and are broadcast, so every rank runs the same steps and holds the same grid."""
    ctx, table = timing_context(runner.tree.depth, ctx, block_size, num_blocks)
    steps = {(b, n): decode_step(b, n, ctx, table, runner.adaptive)
             for n in [0] * plain + [s for s in sizes if s > 0] for b in batch_sizes if b * (n + 1) <= token_budget}
    ms = {key: 1e3 * _median_step_seconds(runner, step) for key, step in steps.items()}
    per_batch = {b: sorted(n for bb, n in ms if bb == b) for b in batch_sizes}
    inverted = tp.broadcast_object(sorted({key for b, ns in per_batch.items() for lo, hi in zip(ns, ns[1:])
                                           if ms[(b, lo)] > ms[(b, hi)] * (1 + GRID_INVERSION_TOLERANCE)
                                           for key in ((b, lo), (b, hi))}))
    for key in inverted:
        ms[tuple(key)] = 1e3 * _median_step_seconds(runner, steps[tuple(key)])
    for b, ns in per_batch.items():
        for lo, hi in reversed(list(zip(ns, ns[1:]))):
            ms[(b, lo)] = min(ms[(b, lo)], ms[(b, hi)])
    return tp.broadcast_object([[b, n, round(t, 4)] for (b, n), t in ms.items()])
