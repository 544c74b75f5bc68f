"""CUDA graphs for the decode and tree-verify forward (prefill and mixed steps stay eager).

A step is graphable when every sequence runs exactly its one pending token (plain decode) or
its pending token plus the candidates of the same Medusa tree. Its shape is then fixed by
(tree, batch padded up to a bucket), and one graph per shape replays the whole model forward
— ~15 kernels per layer, otherwise each launched from Python, plus xformers' dispatch.

Inputs of a graph live in one static int64 buffer, filled by a single host→device copy
before replay: token ids, positions, the slot of each pending token, the cached length each
sequence attends to, and its block table padded to ``width`` pages (the pages of the longest
possible sequence). The graph starts by copying lengths and tables into the int32 tensors
that xformers' attention biases hold — biases are built once at capture and refreshed in
place, as ``xformers.ops.tree_attention`` describes for CUDA graphs. Padded sequences write
their K/V into a pad block that no request owns and attend to one token of it.

Outputs (the final hidden states; for trees also the step's K/V of all layers stacked, for the
commit of the accepted path) are tensors of the graphs' shared memory pool: valid until the
next replay, which is enough because a step consumes them before the next one starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from scheduler.outputs import ScheduledSeq
from spec_decode.tree import MedusaTree

# Padded batch sizes a graph is captured for (vLLM-like: dense at small batches).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def width_buckets(max_width: int, smallest: int = 8) -> tuple[int, ...]:
    """Block-table widths graphs are captured for: x4 steps up to the longest sequence's. The
    paged kernels split their work over the table's full width, so a short sequence in a
    graph sized for the longest costs several times more (measured on H100: a 64-node tree
    step at batch 16, 5.6 ms at 17 pages wide vs 8.6 ms at 129)."""
    widths = []
    w = smallest
    while w < max_width:
        widths.append(w)
        w *= 4
    return tuple(widths) + (max_width,)


def padded_batch(batch: int) -> Optional[int]:
    """The bucket a batch of ``batch`` sequences runs in, or None if it is larger than any."""
    return next((b for b in BATCH_BUCKETS if b >= batch), None)


def graphable_nodes(seqs: list[ScheduledSeq], tree: Optional[MedusaTree], width: int) -> Optional[int]:
    """Query tokens per sequence if this step can replay a graph (1: plain decode, n: an
    n-node tree on every sequence), else None."""
    if not seqs or any(len(s.token_ids) != 1 or len(s.block_table) > width for s in seqs):
        return None
    sizes = {len(s.candidates) for s in seqs}
    if len(sizes) != 1:
        return None
    k = sizes.pop()
    if k == 0:
        return 1
    return tree.num_nodes if tree is not None and k == tree.num_nodes - 1 else None


@dataclass(frozen=True)
class GraphLayout:
    """Offsets of each input in a graph's int64 buffer (``batch`` padded sequences)."""
    batch: int
    nodes: int
    width: int

    @property
    def tokens(self) -> int:
        return self.batch * self.nodes

    @property
    def size(self) -> int:
        return 2 * self.tokens + 2 * self.batch + self.batch * self.width

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        t, b = self.tokens, self.batch
        return {"ids": buf[:t], "positions": buf[t:2 * t], "slots": buf[2 * t:2 * t + b],
                "kv_lens": buf[2 * t + b:2 * t + 2 * b],
                "tables": buf[2 * t + 2 * b:].view(b, self.width)}

    def pack(self, seqs: list[ScheduledSeq], ids: list[int], positions: list[int], root_slots: list[int],
             pad_block: int, block_size: int) -> torch.Tensor:
        """The buffer's contents for a step (host tensor). Sequences beyond ``len(seqs)`` are
        padding: token 0 at position 0, written into and reading one token of the pad block.
        A plain decode token attends to its cache including itself (start_pos + 1); a tree's
        nodes attend to the cache before the root (start_pos) plus the tree itself."""
        pad = self.batch - len(seqs)
        extra = 1 if self.nodes == 1 else 0
        tables: list[int] = []
        pad_row = [pad_block] * self.width
        for s in seqs:
            tables += s.block_table
            tables += pad_row[len(s.block_table):]
        values = (ids + [0] * (pad * self.nodes) + positions + [0] * (pad * self.nodes)
                  + root_slots + [pad_block * block_size] * pad
                  + [s.start_pos + extra for s in seqs] + [1] * pad
                  + tables + pad_row * pad)
        return torch.tensor(values, dtype=torch.long)


def _capture(runner: "CudaGraphRunner", work):
    """(replay, outputs): capture ``work`` in a CUDA graph after a warm-up on a side stream
    (Triton compiles, cuBLAS picks its kernels); replay() re-runs it and returns the same
    static outputs. Off CUDA (``runner.captured`` False) the warm-up still runs and replay just
    calls ``work`` — the same static shapes and buffers, uncaptured — so the CPU suite runs this
    module's logic."""
    if not runner.captured:
        return work, work()  # the warm-up a capture runs, and nothing to capture
    dev = runner.device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=runner.pool):
        outputs = work()

    def replay():
        graph.replay()
        return outputs
    return replay, outputs


class _Graph:
    def __init__(self, runner: "CudaGraphRunner", tree: Optional[MedusaTree], batch: int, width: int) -> None:
        nodes = tree.num_nodes if tree is not None else 1
        self.tree, self.layout = tree, GraphLayout(batch, nodes, width)
        dev = runner.device
        self.buf = self.layout.pack([], [], [], [], runner.pad_block, runner.block_size).to(dev)
        v = self.layout.views(self.buf)
        attn = runner.backend.graph_inputs(batch, nodes, tree.mask if tree is not None else None, width,
                                           v["slots"], runner.pad_block, keep_kv=tree is not None)
        model, backend = runner.model, runner.backend

        def forward():
            attn.kv_lens.copy_(v["kv_lens"])
            attn.block_tables.copy_(v["tables"])
            attn.meta.inputs.step_kv.clear()
            hidden = model(v["ids"], v["positions"], backend, attn.meta)
            kv = attn.meta.inputs.step_kv
            if not kv:
                return hidden, None, None
            return hidden, torch.stack([k for k, _ in kv]), torch.stack([x for _, x in kv])

        # The captured work, callable eagerly (tests compare the two); holding it also keeps
        # alive every tensor the graph reads by address (bias tensors, buffer views). The
        # warm-up runs on the padding inputs, which touch only the pad block.
        self.forward = forward
        # Greedy tails by the tree whose candidates they propose (None: no proposals).
        self.tails: dict[Optional[MedusaTree], _GreedyTail] = {}
        self._replay, (self.hidden, self.step_k, self.step_v) = _capture(runner, forward)

    def replay(self) -> None:
        self.hidden, self.step_k, self.step_v = self._replay()


class _GreedyTail:
    """The rest of a greedy step, captured too: logits → acceptance of the longest matching
    path (or plain argmax) → commit of the accepted nodes' K/V → the heads' proposals at the
    last accepted token. One small int tensor per sequence comes back, [accepted count, the
    accepted tokens (padded to the tree depth), bonus token, next candidates...], instead of
    logits and a dozen host round trips. Reads the forward graph's static outputs."""

    def __init__(self, runner: "CudaGraphRunner", g: "_Graph", proposer) -> None:
        from spec_decode.acceptance import greedy_tree_accept

        tree = g.tree
        b, n = g.layout.batch, g.layout.nodes
        dev, page, cache = runner.device, runner.block_size, runner.backend.kv_cache
        v = g.layout.views(g.buf)
        tokens, start = v["ids"].view(b, n), v["positions"].view(b, n)[:, :1]
        seq = torch.arange(b, device=dev)
        depth = tree.depth if tree is not None else 0
        paths = tree.paths.to(dev) if tree is not None else None
        steps = torch.arange(1, depth + 1, device=dev)
        pad_slot = runner.pad_block * page
        lm_head = runner.model.lm_head

        def tail() -> torch.Tensor:
            argmax = lm_head(g.hidden).argmax(-1).view(b, n)
            if tree is None:
                n_acc = torch.zeros(b, dtype=torch.long, device=dev)
                last = n_acc[:, None]
                accepted = tokens[:, :0]
            else:
                best, n_acc = greedy_tree_accept(paths, tokens, argmax)
                path = paths[best].clamp(min=0)  # [b, depth + 1]
                last = path.gather(1, n_acc[:, None])
                accepted = tokens.gather(1, path[:, 1:])
                # Accepted node at depth d goes to position start + d; the rest to the pad block.
                pos = start + steps
                dst = cache.slots(v["tables"], pos.clamp(max=g.layout.width * page - 1))
                dst = torch.where(steps[None, :] <= n_acc[:, None], dst, pad_slot).flatten()
                src = (seq[:, None] * n + path[:, 1:]).flatten()
                cache.commit(dst, g.step_k.index_select(1, src), g.step_v.index_select(1, src))
            bonus = argmax.gather(1, last)
            parts = [n_acc[:, None], accepted, bonus]
            if proposer is not None:
                parts.append(proposer.propose(g.hidden.index_select(0, seq * n + last[:, 0])))
            return torch.cat(parts, dim=1)

        # The graph reads the closure's tensors (paths, arange, ...) by address: keep them alive.
        # (A lazy capture's warm-up commits exactly what the replay that follows commits.)
        self.tail = tail
        self._replay, self.out = _capture(runner, tail)

    def replay(self) -> torch.Tensor:
        self.out = self._replay()
        return self.out


class CudaGraphRunner:
    """(On CUDA) captures (lazily, or ahead with ``capture``) and replays graphs per (tree, batch bucket,
    width bucket). ``width``: pages of the longest possible sequence."""

    def __init__(self, model, backend, device: torch.device, width: int, pad_block: int) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.width, self.pad_block = width, pad_block
        self.widths = width_buckets(width)
        self.block_size = backend.kv_cache.block_size
        self.captured = device.type == "cuda"  # False: run the same work uncaptured (CPU)
        self.pool = torch.cuda.graph_pool_handle() if self.captured else None
        self.graphs: dict[tuple[Optional[MedusaTree], int, int], _Graph] = {}
        self.capture_seconds = 0.0

    def _timed(self, build):
        """Build (capture) a graph, counting the time towards ``capture_seconds``."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            built = build()
        self.capture_seconds += time.perf_counter() - t0
        return built

    def _graph(self, tree: Optional[MedusaTree], batch: int, width: Optional[int] = None) -> _Graph:
        key = (tree, batch, width or self.widths[0])
        if key not in self.graphs:
            self.graphs[key] = self._timed(lambda: _Graph(self, *key))
        return self.graphs[key]

    def capture(self, trees: list[Optional[MedusaTree]], max_batch: int, max_tokens: int) -> None:
        """Capture every batch bucket up to ``max_batch`` sequences (largest first, so smaller
        graphs reuse the pool's memory) whose tokens fit the step budget, at the smallest width
        (wider graphs are captured when a longer sequence first needs one)."""
        for tree in trees:
            nodes = tree.num_nodes if tree is not None else 1
            top = padded_batch(max_batch) or BATCH_BUCKETS[-1]
            for b in sorted((b for b in BATCH_BUCKETS if b <= top and b * nodes <= max(max_tokens, nodes)),
                            reverse=True):
                self._graph(tree, b)

    def run(self, seqs: list[ScheduledSeq], tree: Optional[MedusaTree], ids: list[int], positions: list[int],
            root_slots: list[int]) -> _Graph:
        """Replay the step's forward graph. Its outputs (``hidden`` [T', H], ``step_k``/``step_v``
        [layers, T', kv_heads, head_dim] or None) cover the padded batch: the step's own T
        tokens come first."""
        need = max(len(s.block_table) for s in seqs)
        g = self._graph(tree, padded_batch(len(seqs)), next(w for w in self.widths if w >= need))
        packed = g.layout.pack(seqs, ids, positions, root_slots, self.pad_block, self.block_size)
        g.buf.copy_(packed)
        g.replay()
        return g

    def run_greedy_tail(self, g: _Graph, proposer) -> torch.Tensor:
        """After ``run``: replay the step's greedy tail (see _GreedyTail); ``proposer`` None
        skips proposals. Returns the padded batch's rows."""
        key = proposer.tree if proposer is not None else None
        if key not in g.tails:
            g.tails[key] = self._timed(lambda: _GreedyTail(self, g, proposer))
        return g.tails[key].replay()
