"""Worker: everything that holds tensors for one tensor-parallel rank.

The driver (Engine) owns the tokenizer, the scheduler and the block manager; a worker owns the
model shard, its paged KV cache, the attention backend, the Medusa proposer and the
ModelRunner. The uniproc executor runs one worker in the engine's process; the Ray executor
runs one per rank in Ray actors. What a worker needs arrives as a WorkerSpec (msgspec, so it
crosses process boundaries as it is) and it reports back a WorkerInfo.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Optional

import msgspec
import torch

from engine.attention import ATTENTION_BACKENDS
from engine.attention.kv_cache import PagedKVCache
from engine.core.config import EngineConfig
from engine.core.outputs import Drafts, SchedulerOutput, StepResult
from engine.core.shapes import cdiv, padded_batch
from engine.models.loader import load_model, read_arch_config
from engine.models.parallel import ShardPlan, TPGroup
from engine.spec.heads import BUNDLED_HEADS_DIR
from engine.spec.tree import AUTO_TREE_SIZES, MedusaTree, build_tree_from_accuracy
from engine.worker.model_runner import ModelRunner
from engine.worker.startup import choose_trees

logger = logging.getLogger("medusa_engine")


class WorkerSpec(msgspec.Struct, kw_only=True):
    config: EngineConfig
    model_path: str
    device: str  # resolved by the driver: "cpu", "cuda", "cuda:1"
    dtype: str  # torch dtype name
    attention_backend: str  # resolved: "torch" or "triton"
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
        self.kv_cache = PagedKVCache(self.arch.num_layers, spec.num_blocks, spec.block_size, self.plan.num_kv_heads,
                                     self.arch.head_dim, self.dtype, self.device,
                                     scratch_tokens=scratch_tokens(proposer, sc.max_num_seqs, sc.max_num_batched_tokens))
        backend = ATTENTION_BACKENDS[spec.attention_backend].build(self.kv_cache, self.device)
        graphs = self._graph_runner(backend) if use_graphs else None
        self.runner = ModelRunner(self.model, backend, self.device, tuple(spec.eos_token_ids), proposer,
                                  cfg.speculative, graphs)
        # tree="auto" / back-off: the tree set, from start-up timings (engine/worker/startup.py).
        self.tree_autotune, self.step_latency, self.subtrees = (
            choose_trees(self.runner, spec, self.head_accuracy, self.tp, use_graphs) if proposer is not None
            else (None, None, None))
        self.graph_memory_gb = self._capture_graphs() if graphs is not None else 0.0
        freeze_heap(self.device)

    def _graph_runner(self, backend):
        from engine.worker.cuda_graphs import PREFILL_GRAPH_PADDING, CudaGraphRunner

        spec, sc = self.spec, self.spec.config.scheduler
        longest = min(spec.config.model.max_model_len or self.arch.max_position_embeddings,
                      spec.num_blocks * spec.block_size)
        width = min(spec.num_blocks, cdiv(longest + 64, spec.block_size))  # + a tree's lookahead
        return CudaGraphRunner(self.model, backend, self.device, width, pad_block=self.kv_cache.pad_block,
                               max_prefill_tokens=PREFILL_GRAPH_PADDING * sc.max_num_batched_tokens,
                               max_mixed_tokens=sc.max_num_batched_tokens, max_seqs=sc.max_num_seqs)

    def _capture_graphs(self) -> float:
        """Every graph a served step can replay, before the first request: each tree a step may
        verify and plain decoding at every batch bucket with their tails, prompts and mixed
        steps. Then the runner is sealed: a served step never captures. Returns the device
        memory the capture took (GiB): what the device's free memory or torch's reserved memory
        grew by, whichever is more. (Memory the process had cached already and the graphs' pools
        reused — a second engine in one process — is not counted.)"""
        sc, graphs = self.spec.config.scheduler, self.runner.graphs
        cuda = self.device.type == "cuda"
        free = (lambda: torch.cuda.mem_get_info(self.device)[0]) if cuda else (lambda: 0)
        reserved = (lambda: torch.cuda.memory_reserved(self.device)) if cuda else (lambda: 0)
        free_before, reserved_before = free(), reserved()
        graphs.capture([None] + sorted(self.runner.trees.values(), key=lambda t: t.num_nodes),
                       sc.max_num_seqs, sc.max_num_batched_tokens)
        if self.runner.adaptive:  # steps of adaptive trees: ragged graphs by batch bucket and tokens
            graphs.capture_ragged(self.runner.tree, sc.max_num_seqs, sc.max_num_batched_tokens)
        self.runner.capture_tails(sc.max_num_seqs)
        graphs.capture_prefill(sc.max_num_batched_tokens)
        graphs.capture_mixed()
        graphs.seal()
        return max(0.0, free_before - free(), reserved() - reserved_before) / 2 ** 30

    def info(self) -> WorkerInfo:
        tree, g = self.runner.tree, self.runner.graphs
        return WorkerInfo(tree=[list(c) for c in tree.choices] if tree else None, subtrees=self.subtrees,
                          head_accuracy=self.head_accuracy,
                          tree_autotune=self.tree_autotune, pid=os.getpid(), step_latency=self.step_latency,
                          num_graphs=g.num_graphs if g else 0, graph_capture_s=round(g.capture_seconds, 2) if g else 0.0,
                          graph_memory_gb=round(self.graph_memory_gb, 3))

    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        return self.runner.execute(out, defer_candidates)

    def take_candidates(self) -> Drafts:
        return self.runner.take_candidates()


def scratch_tokens(proposer, max_num_seqs: int, token_budget: int) -> int:
    """The K/V scratch region's rows: where a step's tree candidates are written before the
    accepted ones are committed — a step's tokens, padded to a graph's batch bucket, for any
    tree tree="auto" or back-off may pick up to the full one (0 without speculation)."""
    if proposer is None:
        return 0
    return max([token_budget] + [(padded_batch(min(max_num_seqs, token_budget // n)) or 0) * n
                                 for n in range(2, proposer.tree.num_nodes + 1)])


def use_cuda_graphs(config: EngineConfig, device: torch.device, backend: str, world_size: int) -> bool:
    """Graphs need a backend whose metadata refreshes in place (it declares ``cuda_graphs``) on
    CUDA. Under tensor parallelism steps stay eager: capturing the NCCL all-reduces is not
    validated here."""
    return (not config.model.enforce_eager and device.type == "cuda" and ATTENTION_BACKENDS[backend].cuda_graphs
            and world_size == 1)


def build_proposer(config: EngineConfig, model, arch, device, dtype):
    from engine.spec.heads import MedusaHeads
    from engine.spec.proposer import MedusaProposer, read_proposal_vocab

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
