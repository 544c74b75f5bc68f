"""CUDA graphs for every step without a tree, and for uniform verify steps.

A step has a fixed shape when every sequence runs exactly its one pending token (plain
decode) or its pending token plus the same local query block (a speculative tree: any object
with ``num_nodes`` and an ancestor ``mask``). Its shape is then fixed by (query block, batch
padded up to a bucket), and one graph per shape replays the whole model forward — ~15
kernels per layer, otherwise each launched from Python. Whatever follows the forward and
should run on the device too (the runner's decide–commit–propose tail) is handed in as a
callable and captured after it, reading the forward's static outputs: this module knows
nothing of what that callable does.

Every graph is captured before the engine serves (``CudaGraphRunner.seal``): a capture in a
served step stalls every sequence in it. So the set of shapes is kept small enough to
capture whole at start-up: one block-table width for all graphs (the longest sequence's: the
attention kernels' work follows each sequence's length, and only the pages a step uses are
shipped, ``_tables_view``), graphs per batch bucket and tree of the engine's set.

Inputs of a graph live in one static int64 buffer, filled by a single host→device copy
before replay: token ids, each sequence's start position and its block table. Everything
else is derived on the device at the start of the graph, so the host never builds per-token
lists for a decode or verify step (at batch 64 with a 64-node tree those lists cost ~1 ms a
step): positions are start + the node's depth; a pending token's K/V slot comes from its
block table, a tree candidate's is its row of the cache's scratch region; each sequence
attends to the ``start`` positions cached before its pending token, then to the step's own
tokens under the query block's mask. Lengths and tables are copied into the int32 tensors
that the attention metadata holds — built once at capture by the backend's own builder and
refreshed in place. Padded sequences start at 0 in a pad block that no request owns.

A step in which every sequence prefills its prompt from position 0 (nothing cached: a new
request's prompt, or its first chunk) has a fixed shape too once padded: each prompt padded at
its end to a length bucket (``PREFILL_BUCKETS``), the batch to its bucket. Its tokens attend
causally within their own block, so the padding never reaches a real token; pad tokens write
their K/V into the pad block. Eagerly such a step is bound by the host (measured on an H100,
bundled model: ~36 ms for one prompt of 40–150 tokens, 30 decode steps' worth); replayed it
is the GPU's work. Graphs of one prompt are captured at start-up; a step of several prompts
runs in a mixed-step graph (below). Their K/V slots come from the host.

Any other step without a tree — prefill chunks after a cached prefix, prompts beside decode
tokens — is a mixed step (``MixedStep``): its tokens lie flat, sequence after sequence, padded
at the end to a token bucket (``MIXED_BUCKETS``); its sequences, padded to the engine's
largest batch bucket, are described by where their tokens start, their cached lengths and
tables, and attention is the varlen kernel (engine/kernels/varlen_attention.py), which reads
only those. One graph per token bucket then fits any mix of chunks and decode tokens.
Positions and K/V slots come from the host (``InputBatch.locate``), as for fresh prefills;
pad tokens write into the pad block. Eagerly such a step is bound by the host (~40 ms on an
H100 with the bundled model, ±20% run to run).

A step of adaptive trees (``RaggedStep``: every sequence its pending token plus a tree of its
own, or nothing) has a fixed shape once its tokens are padded to a count of its batch bucket
(engine/core/shapes.py ``ragged_tokens``, the counts the adaptive plan chooses among): its
tokens' nodes in the full tree and sequences come from the host, and positions, slots and
each sequence's ancestor mask are derived on the device (``_RaggedGraph``).

The output (the final hidden states) is a tensor of the graphs' shared memory pool: valid
until the next replay, which is enough because a step consumes it before the next starts.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Callable, Hashable, Optional

import numpy as np
import torch

from engine.core.outputs import ScheduledSeq
from engine.core.shapes import BATCH_BUCKETS, padded_batch, ragged_tokens
from engine.kernels.varlen_tiles import tile_starts

# Prompt lengths fresh-prefill graphs are captured for: a prompt is padded up to the next one.
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# A fresh-prefill graph may hold this many times the step's token budget once padded (16
# prompts of 60–155 tokens: 16 x 256 slots for ~1,000 tokens). Padding costs GPU time that an
# eager step of the bundled model (~40 ms, host-bound) would cost many times over.
PREFILL_GRAPH_PADDING = 4


# Token counts mixed-step graphs are captured for (up to the step's token budget): padding costs
# at most the step's own tokens again.
MIXED_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class GraphTensors:
    """What work captured after a decode or verify forward (a "tail") reads, by name: the
    forward's static output and inputs, and the tail's own. In a captured graph these are the
    same tensors every replay; uncaptured (CPU) the latest step's."""
    hidden: torch.Tensor  # [B*N, H] final hidden states, sequence after sequence (padding included)
    tokens: torch.Tensor  # [B, N] each sequence's pending token, then its candidates
    starts: torch.Tensor  # [B, 1] the pending token's position
    tables: torch.Tensor  # [B, W] int64 block tables, contiguous
    inputs: Optional[torch.Tensor]  # [B, k] per-sequence values copied in before each run (run_tail's)
    after: Optional[torch.Tensor]  # the output of the tail this one follows (run_tail's ``after``)


Tail = Callable[[GraphTensors], torch.Tensor]


@lru_cache(maxsize=None)
def _causal_mask(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


@dataclass(frozen=True)
class FreshPrefill:
    """The query block of a step in which every sequence prefills from position 0: ``num_nodes``
    tokens (its prompt, padded at the end), causal among themselves, nothing cached before."""
    num_nodes: int
    fresh = True  # tells the attention backend there is no cached prefix to read

    @property
    def mask(self) -> torch.Tensor:
        return _causal_mask(self.num_nodes)


@dataclass(frozen=True)
class MixedStep:
    """The shape of a step of prefill chunks and decode tokens, no tree: ``num_tokens`` tokens
    (the step's, padded at the end) over up to the engine's largest batch bucket of sequences."""
    num_tokens: int


@dataclass(frozen=True)
class _FlatLayout:
    """A graph's int64 input buffer over ``tokens`` tokens and ``batch`` sequences: runs of
    per-token and per-sequence values, each by name (``fields``), then the block tables
    ``width`` pages wide (``_tables_view``)."""
    tokens: int
    batch: int
    width: int

    def fields(self) -> tuple[tuple[str, int], ...]:
        """(name, length) of each run before the tables, in buffer order."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self._tables_at + self.batch * self.width

    @property
    def _tables_at(self) -> int:
        return sum(n for _, n in self.fields())

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        views, at = {}, 0
        for name, n in self.fields():
            views[name] = buf[at:at + n]
            at += n
        views["tables"] = _tables_view(buf, at, self.batch, self.width)
        return views


class MixedLayout(_FlatLayout):
    """Offsets of each input in a mixed-step graph's int64 buffer: per token its id, position
    and K/V slot; per sequence (``batch``, padding included) where its tokens start (+ the end),
    its cached length, its first query tile (+ the count) and its table ``width`` pages wide."""

    def fields(self) -> tuple[tuple[str, int], ...]:
        t, b = self.tokens, self.batch
        return (("ids", t), ("positions", t), ("slots", t), ("q_starts", b + 1), ("kv_lens", b),
                ("first_tiles", b + 1))

    def pack(self, seqs: list[ScheduledSeq], ids: list[int], positions: list[int], slots: list[int],
             pad_block: int, pad_slot: int) -> tuple[torch.Tensor, int]:
        """The buffer's contents for a step (host tensor) and how much of it the step uses (see
        ``_tables_view``): the step's flat ids, positions and slots (``InputBatch.locate``);
        tokens past them write the pad slot, sequences past ``seqs`` have no tokens."""
        used = self._tables_at + self.batch * _table_columns(seqs)
        buf = np.zeros(used, dtype=np.int64)
        n = len(ids)
        t, b = self.tokens, self.batch
        buf[:n], buf[t:t + n], buf[2 * t:2 * t + n] = ids, positions, slots
        buf[2 * t + n:3 * t] = pad_slot
        q_lens = [len(s.token_ids) for s in seqs]
        at = 3 * t
        buf[at:at + len(seqs) + 1] = list(accumulate(q_lens, initial=0))
        buf[at + len(seqs) + 1:at + b + 1] = n
        at += b + 1
        buf[at:at + len(seqs)] = [s.start_pos + k for s, k in zip(seqs, q_lens)]
        at += b
        first = tile_starts(q_lens)
        buf[at:at + len(first)] = first
        buf[at + len(first):at + b + 1] = first[-1]
        _pack_tables(buf[self._tables_at:], seqs, b, pad_block)
        return torch.from_numpy(buf), used


def _table_columns(seqs: list[ScheduledSeq]) -> int:
    """Pages of the longest block table among ``seqs`` (at least one: padding sequences read
    page 0)."""
    return max([1] + [len(s.block_table) for s in seqs])


def _tables_view(buf: torch.Tensor, at: int, batch: int, width: int) -> torch.Tensor:
    """The block tables [batch, width] held column after column from ``buf[at]`` on. Page j of
    every sequence lies together, so a step whose longest table has J pages fills and copies
    only the first ``J * batch`` entries: every graph is captured at the engine's full width
    (its kernels' cost follows each sequence's length, not the table's width), and a step
    never ships a table the width of the longest possible sequence. Columns past J keep what
    earlier steps left; nothing reads them (a sequence reads the pages below its length)."""
    return buf[at:at + batch * width].view(width, batch).t()


def _pack_tables(dst: np.ndarray, seqs: list[ScheduledSeq], batch: int, pad_block: int) -> None:
    """Fill the first ``_table_columns(seqs)`` columns of ``_tables_view`` (``dst`` starts at
    the tables): each sequence's pages, the pad block past them and for padding sequences."""
    cols = _table_columns(seqs)
    tables = dst[:cols * batch].reshape(cols, batch)
    tables[:] = pad_block
    for i, s in enumerate(seqs):
        tables[:len(s.block_table), i] = s.block_table


@dataclass(frozen=True)
class RaggedStep:
    """The shape of a step of adaptive trees (engine/core/adaptive.py): every sequence runs its
    pending token plus a tree of its own — the full tree ``tree`` cut down to some of its
    candidates, or nothing — ``num_tokens`` tokens in all (the step's, padded at the end)."""
    num_tokens: int
    tree: object  # the full MedusaTree


class RaggedLayout(_FlatLayout):
    """Offsets of each input in a ragged step's int64 buffer: per token its id, its node in the
    full tree (0: the pending token) and its sequence; per sequence (``batch``, padding
    included) where its tokens start (+ the end), its pending token's position and its table
    ``width`` pages wide."""

    def fields(self) -> tuple[tuple[str, int], ...]:
        t, b = self.tokens, self.batch
        return (("ids", t), ("nodes", t), ("seqs", t), ("q_starts", b + 1), ("starts", b))

    def pack(self, seqs: list[ScheduledSeq], pad_block: int) -> tuple[torch.Tensor, int]:
        """The buffer's contents for a step of adaptive trees (host tensor) and how much of it the
        step uses (``_tables_view``): each sequence's pending token, then its candidates, with
        their nodes in the full tree (``tree_nodes`` + 1). Tokens past the step's are padding
        (they write the pad slot); so are sequences past ``seqs`` (no tokens)."""
        used = self._tables_at + self.batch * _table_columns(seqs)
        buf = np.zeros(used, dtype=np.int64)
        t, b = self.tokens, self.batch
        at = 0
        for i, s in enumerate(seqs):
            n = 1 + len(s.candidates)
            buf[at] = s.token_ids[0]
            buf[at + 1:at + n] = s.candidates
            buf[t + at + 1:t + at + n] = [c + 1 for c in s.tree_nodes]
            buf[2 * t + at:2 * t + at + n] = i
            buf[3 * t + i] = at
            at += n
        buf[3 * t + len(seqs):3 * t + b + 1] = at
        buf[3 * t + b + 1:3 * t + b + 1 + len(seqs)] = [s.start_pos for s in seqs]
        _pack_tables(buf[self._tables_at:], seqs, b, pad_block)
        return torch.from_numpy(buf), used


def graphable_nodes(seqs: list[ScheduledSeq], nodes: Optional[int], width: int) -> bool:
    """Has this step a decode or verify graph's shape? Every sequence runs one pending token
    plus ``nodes - 1`` candidates (``nodes`` None: the step is not uniform) and fits the graphs'
    table width."""
    return (nodes is not None and bool(seqs) and padded_batch(len(seqs)) is not None
            and all(len(s.token_ids) == 1 and len(s.block_table) <= width for s in seqs))


@dataclass(frozen=True)
class GraphLayout:
    """Offsets of each input in a graph's int64 buffer (``batch`` padded sequences of ``nodes``
    tokens): ids, starts, tables, and — for fresh prefills only (``host_slots``) — the slot
    each token's K/V is written to."""
    batch: int
    nodes: int
    width: int
    host_slots: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.nodes

    @property
    def size(self) -> int:
        return self.tokens * (2 if self.host_slots else 1) + self.batch * (1 + self.width)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        t, b = self.tokens, self.batch
        views = {"ids": buf[:t], "starts": buf[t:t + b]}
        at = t + b
        if self.host_slots:
            views["slots"] = buf[at:at + t]
            at += t
        views["tables"] = _tables_view(buf, at, b, self.width)
        return views

    def pack(self, seqs: list[ScheduledSeq], ids: list[int], pad_block: int,
             slots: Optional[list[int]] = None, pad_slot: int = 0) -> tuple[torch.Tensor, int]:
        """The buffer's contents for a step (host tensor) and how much of it the step uses (the
        tables' first columns, ``_tables_view``). ``ids``: every sequence's ``nodes`` tokens,
        sequence after sequence; ``slots`` likewise (``host_slots`` layouts only; sequences'
        missing ones — padding — go to ``pad_slot``). Sequences beyond ``len(seqs)`` are
        padding: token 0 starting at 0, their table the pad block."""
        t, b = self.tokens, self.batch
        at = t + b + (t if self.host_slots else 0)
        # (A fresh prefill's tables are not read: its prompt may be longer than the width.)
        cols = 1 if self.host_slots else _table_columns(seqs)
        used = at + cols * b
        buf = np.zeros(used, dtype=np.int64)
        buf[:len(ids)] = ids
        buf[t:t + len(seqs)] = [s.start_pos for s in seqs]
        if self.host_slots:
            buf[t + b:t + b + t] = pad_slot
            if slots is not None:
                buf[t + b:t + b + len(slots)] = slots
            buf[at:used] = pad_block
        else:
            _pack_tables(buf[at:], seqs, b, pad_block)
        return torch.from_numpy(buf), used


def _capture(runner: "CudaGraphRunner", work, read_at_start: bool = True):
    """(replay, outputs): capture ``work`` in a CUDA graph after a warm-up on a side stream
    (Triton compiles, cuBLAS picks its kernels); replay() re-runs it and returns the same
    static outputs. Off CUDA (``runner.captured`` False) replay just calls ``work`` — the same
    static shapes and buffers, uncaptured — so the CPU suite runs this module's logic; the
    warm-up runs there only when start-up reads the outputs (``read_at_start``: the tails
    captured after a decode, verify or ragged forward read its hidden states), else the
    outputs are None until the first replay (a prompt's or mixed step's forward on a CPU is
    seconds of start-up for nothing; a tail or row graph is replayed at once anyway)."""
    if not runner.captured:
        return work, (work() if read_at_start else None)
    dev = runner.device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=runner.pool):
        outputs = work()
    # The first launch of an instantiated graph also uploads it to the device (cudaGraphUpload,
    # done implicitly): pay that here, not in the first step that replays it. Measured (H100,
    # back-off at batch 16, benchmarks/step_trace.py): left to the first replay, steps on a
    # tree size or batch bucket met for the first time ran 4-6 ms among 2 ms ones, and the run
    # took 181 ms against plain decoding's 171; paid here, 150 against 177. The replay reruns
    # the warm-up's work on the same inputs.
    graph.replay()

    def replay():
        graph.replay()
        return outputs
    return replay, outputs


def _device_buffer(layout, packed: tuple[torch.Tensor, int], pad_block: int, device: torch.device) -> torch.Tensor:
    """A graph's static input buffer on the device: all of ``layout``, every table entry the
    pad block, then its used part as ``packed`` (a layout's ``pack`` of no sequences)."""
    host, used = packed
    buf = torch.zeros(layout.size, dtype=torch.int64)
    layout.views(buf)["tables"].fill_(pad_block)
    buf[:used] = host
    return buf.to(device)


def load_inputs(buf: torch.Tensor, packed: tuple[torch.Tensor, int]) -> None:
    """Copy a step's packed inputs into the used part of a graph's buffer."""
    host, used = packed
    buf[:used].copy_(host)


class _Graph:
    """One captured forward of a fixed shape, and the tails captured after it."""

    def __init__(self, runner: "CudaGraphRunner", shape, batch: int, width: int) -> None:
        nodes = shape.num_nodes if shape is not None else 1
        fresh = getattr(shape, "fresh", False)
        self.shape, self.layout = shape, GraphLayout(batch, nodes, width, host_slots=fresh)
        self.decodes = not fresh  # a decode or verify step: the device tails follow it
        dev = runner.device
        kv = runner.backend.kv_cache
        self.buf = _device_buffer(self.layout, self.layout.pack([], [], runner.pad_block, pad_slot=kv.pad_slot),
                                  runner.pad_block, dev)
        self.views = self.layout.views(self.buf)
        v = self.views
        # Each node's offset from its sequence's start: its depth in a tree, its index in a
        # prompt, 0 for a decode token.
        offsets = torch.tensor(shape.depths if hasattr(shape, "depths") else range(nodes), device=dev)
        write_slots = v["slots"] if fresh else torch.zeros(batch * nodes, dtype=torch.long, device=dev)
        # A tree's candidates are written to their rows of the scratch region.
        scratch_rows = kv.scratch_slot0 + torch.arange(batch * nodes, device=dev).view(batch, nodes)[:, 1:]
        attn = runner.backend.graph_inputs(batch, nodes, shape.mask if shape is not None else None, width,
                                           write_slots, runner.pad_block, fresh=fresh)
        model, backend = runner.model, runner.backend
        # What the tails after the forward read, by name: each sequence's tokens [batch, nodes]
        # (pending token, then candidates), its start [batch, 1] and its block table [batch,
        # width] — contiguous (the buffer holds the tables page-major; kernels read rows).
        self.tokens, self.starts = v["ids"].view(batch, nodes), v["starts"][:, None]
        self.tables = torch.full((batch, width), runner.pad_block, dtype=torch.long, device=dev)

        def forward() -> torch.Tensor:
            starts, tables = v["starts"], self.tables
            if not fresh:
                tables.copy_(v["tables"])
                root = kv.slots(tables, starts[:, None])  # the pending token's slot in its blocks
                write_slots.copy_(torch.cat([root, scratch_rows], dim=1).flatten())
                attn.kv_lens.copy_(starts)  # the prefix before each sequence's pending token
                attn.block_tables.copy_(tables)
            return model(v["ids"], (starts[:, None] + offsets).flatten(), backend, attn.meta)

        # The captured work, callable eagerly (tests compare the two); holding it also keeps
        # alive every tensor the graph reads by address (bias tensors, buffer views). The
        # warm-up runs on the padding inputs, which touch only the pad block.
        self.forward = forward
        self.tails: dict[Hashable, tuple[Callable[[], torch.Tensor], Callable]] = {}
        self.tail_inputs: dict[Hashable, torch.Tensor] = {}  # see CudaGraphRunner.run_tail
        # Each tail's output after its last run (captured: the same static tensor every replay),
        # for a tail that reads another's: the proposal reads the decision.
        self.tail_outputs: dict[Hashable, torch.Tensor] = {}
        self._replay, self.hidden = _capture(runner, forward, read_at_start=self.decodes)

    def replay(self) -> torch.Tensor:
        self.hidden = self._replay()
        return self.hidden

    def tensors(self, inputs: Optional[torch.Tensor], after: Optional[Hashable]) -> GraphTensors:
        """What a tail reads now (called when the tail runs: uncaptured, ``hidden`` is new each step)."""
        return GraphTensors(hidden=self.hidden, tokens=self.tokens, starts=self.starts, tables=self.tables,
                            inputs=inputs, after=self.tail_outputs[after] if after is not None else None)


class _MixedGraph:
    """One captured forward of a mixed step: ``shape.num_tokens`` tokens over ``batch``
    sequences with tables ``width`` pages wide."""

    def __init__(self, runner: "CudaGraphRunner", shape: MixedStep, batch: int, width: int) -> None:
        self.shape, self.layout = shape, MixedLayout(shape.num_tokens, batch, width)
        self.decodes = False
        kv = runner.backend.kv_cache
        self.buf = _device_buffer(self.layout, self.layout.pack([], [], [], [], runner.pad_block, kv.pad_slot),
                                  runner.pad_block, runner.device)
        v = self.views = self.layout.views(self.buf)
        attn = runner.backend.mixed_inputs(batch, width, v["slots"])
        model, backend = runner.model, runner.backend

        def forward() -> torch.Tensor:
            attn.q_starts.copy_(v["q_starts"])
            attn.kv_lens.copy_(v["kv_lens"])
            attn.first_tiles.copy_(v["first_tiles"])
            attn.block_tables.copy_(v["tables"])
            return model(v["ids"], v["positions"], backend, attn.meta)

        self.forward = forward  # (see _Graph)
        self._replay, self.hidden = _capture(runner, forward, read_at_start=False)

    def replay(self) -> torch.Tensor:
        self.hidden = self._replay()
        return self.hidden


@dataclass(frozen=True)
class RaggedTensors:
    """What the tails after a ragged forward read (engine/sample/tail.py ``greedy_ragged``):
    the forward's static output and inputs."""
    hidden: torch.Tensor  # [T, H] final hidden states, the step's tokens first
    ids: torch.Tensor  # [T] token ids
    nodes: torch.Tensor  # [T] each token's node in the full tree (0: a pending token)
    seqs: torch.Tensor  # [T] each token's sequence
    q_starts: torch.Tensor  # [B + 1] each sequence's first token (the last entry: the step's tokens)
    starts: torch.Tensor  # [B] each pending token's position
    tables: torch.Tensor  # [B, W] int64 block tables, contiguous
    after: Optional[torch.Tensor]  # the output of the tail this one follows


class _RaggedGraph:
    """One captured forward of a step of adaptive trees: ``shape.num_tokens`` tokens over
    ``batch`` sequences (a batch bucket: the attention splits its prefixes by it, as an eager
    step of that batch does). Each token's position (its sequence's start + its node's depth)
    and K/V slot (a pending token's in its blocks, a candidate's scratch row, padding's the pad
    slot), and each sequence's ancestor mask (the full tree's, cut to its nodes) are derived
    on the device from the packed ids, nodes, sequences and starts."""

    def __init__(self, runner: "CudaGraphRunner", shape: RaggedStep, batch: int, width: int) -> None:
        self.shape, self.layout = shape, RaggedLayout(shape.num_tokens, batch, width)
        self.decodes = False  # (not a uniform step: its tails are the ragged ones)
        dev, kv = runner.device, runner.backend.kv_cache
        self.buf = _device_buffer(self.layout, self.layout.pack([], runner.pad_block), runner.pad_block, dev)
        v = self.views = self.layout.views(self.buf)
        tree, t = shape.tree, shape.num_tokens
        n = tree.num_nodes
        depths = torch.as_tensor(tree.depths, device=dev)
        full_mask = tree.mask.to(dev)
        write_slots = torch.zeros(t, dtype=torch.long, device=dev)
        attn = runner.backend.ragged_inputs(batch, n, width, write_slots)
        self.tables = torch.full((batch, width), runner.pad_block, dtype=torch.long, device=dev)
        rows, local = torch.arange(t, device=dev), torch.arange(n, device=dev)
        model, backend = runner.model, runner.backend

        def forward() -> torch.Tensor:
            ids, nodes, seqs, q_starts, starts = v["ids"], v["nodes"], v["seqs"], v["q_starts"], v["starts"]
            tables = self.tables
            tables.copy_(v["tables"])
            start = starts.index_select(0, seqs)
            root = kv.slots(tables.index_select(0, seqs), start[:, None])[:, 0]
            slot = torch.where(nodes == 0, root, kv.scratch_slot0 + rows)
            write_slots.copy_(torch.where(rows < q_starts[-1], slot, kv.pad_slot))
            # Sequence b's i-th token is the full tree's node nodes[q_starts[b] + i]: its mask is
            # the full mask's rows and columns of those nodes.
            count = q_starts[1:] - q_starts[:-1]
            valid = local[None, :] < count[:, None]
            mine = torch.where(valid, nodes[(q_starts[:-1, None] + local[None, :]).clamp(max=t - 1)], 0)
            mask = full_mask[mine[:, :, None], mine[:, None, :]] & valid[:, :, None] & valid[:, None, :]
            attn.masks.copy_(mask)
            attn.q_starts.copy_(q_starts)
            attn.kv_lens.copy_(starts)
            attn.block_tables.copy_(tables)
            return model(ids, start + depths.index_select(0, nodes), backend, attn.meta)

        self.forward = forward  # (see _Graph)
        self.tails: dict[Hashable, tuple[Callable[[], torch.Tensor], Callable]] = {}
        self.tail_inputs: dict[Hashable, torch.Tensor] = {}
        self.tail_outputs: dict[Hashable, torch.Tensor] = {}
        self._replay, self.hidden = _capture(runner, forward)

    def replay(self) -> torch.Tensor:
        self.hidden = self._replay()
        return self.hidden

    def tensors(self, inputs: Optional[torch.Tensor], after: Optional[Hashable]) -> RaggedTensors:
        v = self.views
        return RaggedTensors(hidden=self.hidden, ids=v["ids"], nodes=v["nodes"], seqs=v["seqs"],
                             q_starts=v["q_starts"], starts=v["starts"], tables=self.tables,
                             after=self.tail_outputs[after] if after is not None else None)


class CudaGraphRunner:
    """(On CUDA) captures graphs per (query shape, batch bucket) at start-up and replays them.
    ``width``: pages of the longest possible sequence — every graph's block tables are that
    wide (see ``_tables_view``).

    Capture happens only before ``seal()``: the worker captures every graph a served step can
    replay (each tree of the engine's set and plain decoding at every batch bucket, the tails
    after them, prompts, mixed steps, the host-decided steps' proposal) and then seals. A
    sealed runner never captures — a capture stalls every sequence of the step for tens to
    hundreds of ms, and on a server each new shape met was a stall for every user (issue 29:
    back-off at batch 64 on an H100 ran at 0.21x plain decoding, its runs capturing 1–3 graphs
    each). A step whose shape has no graph then runs that part eagerly and is counted in
    ``misses`` (an eager step costs a host-bound ~40 ms on an H100 with the bundled model:
    a miss is a bug in what start-up captures, reported, never hidden)."""

    def __init__(self, model, backend, device: torch.device, width: int, pad_block: int,
                 max_prefill_tokens: int = 0, max_mixed_tokens: int = 0, max_seqs: int = 0) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.width, self.pad_block = width, pad_block
        # Padded tokens a fresh-prefill graph may hold (the step's token budget; 0: none).
        self.max_prefill_tokens = max_prefill_tokens
        # Mixed steps: graphs up to the bucket of ``max_mixed_tokens`` (the step's token
        # budget; 0: none), over the batch bucket of ``max_seqs`` sequences (any count works:
        # past the largest bucket, exactly that many).
        self.mixed_tokens = tuple(MIXED_BUCKETS[:next((i + 1 for i, n in enumerate(MIXED_BUCKETS)
                                                        if n >= max_mixed_tokens), len(MIXED_BUCKETS))]
                                  if max_mixed_tokens and max_seqs else ())
        self.mixed_batch = padded_batch(max_seqs) or max_seqs
        self.captured = device.type == "cuda"  # False: run the same work uncaptured (CPU)
        self.pool = torch.cuda.graph_pool_handle() if self.captured else None
        self.graphs: dict[tuple[Hashable, int], object] = {}
        # The token counts of the ragged-step graphs captured, ascending, per (full tree, batch
        # bucket): a step looks up the smallest it fits (``ragged_shape``) without a scan.
        self._ragged_counts: dict[tuple[Hashable, int], list[int]] = {}
        # Row-wise work outside a forward graph, per (key, batch bucket): its static inputs,
        # replay, and the work (held: it keeps what the graph reads alive). See run_rows.
        self.row_graphs: dict[tuple[Hashable, int], tuple[list[torch.Tensor], Callable, Callable]] = {}
        self.capture_seconds = 0.0
        self.sealed = False
        # Work a sealed runner ran eagerly because its shape had no graph (forwards, tails,
        # row-wise work): each one is a step that did not run as fast as it should have.
        self.misses = 0

    def seal(self) -> None:
        """From now on nothing is captured (see the class doc)."""
        self.sealed = True

    @property
    def num_graphs(self) -> int:
        return (len(self.graphs) + len(self.row_graphs)
                + sum(len(g.tails) for g in self.graphs.values() if isinstance(g, _Graph)))

    def _timed(self, build):
        """Build (capture) a graph, counting the time towards ``capture_seconds``."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            built = build()
        self.capture_seconds += time.perf_counter() - t0
        return built

    def _graph(self, shape, batch: int):
        """The graph of ``shape`` at ``batch`` (captured now unless sealed); None when sealed
        and never captured (counted in ``misses``)."""
        key = (shape, batch)
        g = self.graphs.get(key)
        if g is None:
            if self.sealed:
                self.misses += 1
                return None
            cls = (_MixedGraph if isinstance(shape, MixedStep) else _RaggedGraph if isinstance(shape, RaggedStep)
                   else _Graph)
            # A fresh prefill reads no table: its buffer holds one column.
            width = 1 if getattr(shape, "fresh", False) else self.width
            g = self.graphs[key] = self._timed(lambda: cls(self, shape, batch, width))
            if isinstance(shape, RaggedStep):
                bisect.insort(self._ragged_counts.setdefault((shape.tree, batch), []), shape.num_tokens)
        return g

    def capture(self, shapes: list, max_batch: int, max_tokens: int) -> None:
        """Capture every batch bucket a step of each shape can pad to: up to the bucket of the
        most sequences whose tokens fit the step budget (largest first, so smaller graphs reuse
        the pool's memory) — the scratch region is sized the same way. The padded bucket may
        hold more tokens than the budget: 62 sequences of a 33-node tree fit 2,048 tokens and
        pad to the 64 bucket."""
        for shape in shapes:
            nodes = shape.num_nodes if shape is not None else 1
            fit = min(max_batch, max(1, max_tokens // nodes))
            top = padded_batch(fit) or BATCH_BUCKETS[-1]
            for b in sorted((b for b in BATCH_BUCKETS if b <= top), reverse=True):
                self._graph(shape, b)

    def capture_prefill(self, max_prompt_tokens: int) -> None:
        """Capture the one-prompt fresh-prefill graph of every length bucket a step's prompt
        chunk (at most ``max_prompt_tokens``) may need (several prompts: ``prefill_shape``)."""
        top = next((n for n in PREFILL_BUCKETS if n >= max_prompt_tokens), PREFILL_BUCKETS[-1])
        for length in sorted((n for n in PREFILL_BUCKETS if n <= min(top, self.max_prefill_tokens)), reverse=True):
            self._graph(FreshPrefill(length), 1)

    def capture_mixed(self) -> None:
        """Capture the mixed-step graph of every token bucket."""
        for tokens in sorted(self.mixed_tokens, reverse=True):
            self._graph(MixedStep(tokens), self.mixed_batch)

    def mixed_shape(self, seqs: list[ScheduledSeq]) -> Optional[MixedStep]:
        """The mixed-step shape of a step without a tree, if its tokens fit a bucket, its
        sequences the graphs' batch and its tables their width; else None."""
        if not self.mixed_tokens or not seqs or len(seqs) > self.mixed_batch or any(s.tree_size for s in seqs):
            return None
        tokens = sum(len(s.token_ids) for s in seqs)
        bucket = next((n for n in self.mixed_tokens if n >= tokens), None)
        if bucket is None or max(len(s.block_table) for s in seqs) > self.width:
            return None
        return MixedStep(bucket)

    def run_mixed(self, shape: MixedStep, seqs: list[ScheduledSeq], ids: list[int], positions: list[int],
                  slots: list[int]) -> Optional[torch.Tensor]:
        """Replay the mixed-step graph of ``shape`` for the step's flat inputs; returns the
        hidden states [T', H] of the padded step, the step's own tokens first (None: no graph)."""
        g = self._graph(shape, self.mixed_batch)
        if g is None:
            return None
        load_inputs(g.buf, g.layout.pack(seqs, ids, positions, slots, self.pad_block, self.backend.kv_cache.pad_slot))
        return g.replay()

    def prefill_shape(self, seqs: list[ScheduledSeq]) -> Optional[FreshPrefill]:
        """The fresh-prefill shape of a step in which every sequence prefills at least two tokens
        from position 0 (no tree), if its padded size fits ``max_prefill_tokens`` and its graph
        exists; else None. With mixed graphs, only a shape captured already (at start-up: one
        prompt per length bucket) is taken — the mixed graphs run any other mix."""
        if not seqs or any(s.start_pos or s.tree_size or len(s.token_ids) < 2 for s in seqs):
            return None
        longest = max(len(s.token_ids) for s in seqs)
        length = next((n for n in PREFILL_BUCKETS if n >= longest), None)
        batch = padded_batch(len(seqs))
        if length is None or batch is None or batch * length > self.max_prefill_tokens:
            return None
        if (self.mixed_tokens or self.sealed) and (FreshPrefill(length), batch) not in self.graphs:
            return None
        return FreshPrefill(length)

    def run_prefill(self, shape: FreshPrefill, seqs: list[ScheduledSeq], ids: list[int],
                    slots: list[int]) -> Optional[torch.Tensor]:
        """Replay the fresh-prefill graph of ``shape`` for the step's flat inputs (sequence after
        sequence); returns the hidden states of the step's own tokens [T, H], in step order
        (None: no graph)."""
        g = self._graph(shape, padded_batch(len(seqs)))
        if g is None:
            return None
        n = shape.num_nodes
        pad_slot = self.backend.kv_cache.pad_slot
        p_ids: list[int] = []
        p_slots: list[int] = []
        rows: list[int] = []
        start = 0
        for i, s in enumerate(seqs):
            k, pad = len(s.token_ids), n - len(s.token_ids)
            p_ids += ids[start:start + k] + [0] * pad
            p_slots += slots[start:start + k] + [pad_slot] * pad
            rows += range(i * n, i * n + k)
            start += k
        load_inputs(g.buf, g.layout.pack(seqs, p_ids, self.pad_block, p_slots, pad_slot))
        return g.replay().index_select(0, torch.tensor(rows, device=self.device))

    def run(self, shape, seqs: list[ScheduledSeq], ids: list[int]) -> Optional[_Graph]:
        """Replay the step's forward graph (``shape``: None for one token per sequence, else the
        query block; ``ids``: each sequence's pending token, then its candidates). Its
        ``hidden`` [T', H] covers the padded batch: the step's own T tokens come first. None:
        no graph of this shape (the step runs eagerly)."""
        g = self._graph(shape, padded_batch(len(seqs)))
        if g is None:
            return None
        load_inputs(g.buf, g.layout.pack(seqs, ids, self.pad_block))
        g.replay()
        return g

    def capture_ragged(self, tree, max_seqs: int, max_tokens: int) -> None:
        """Capture the ragged-step graph (adaptive trees of ``tree``, the full tree) of every
        batch bucket up to ``max_seqs`` sequences and every token count ``ragged_tokens`` names
        for it within ``max_tokens``."""
        top = padded_batch(max_seqs) or BATCH_BUCKETS[-1]
        for b in sorted((b for b in BATCH_BUCKETS if b <= top), reverse=True):
            for t in sorted(ragged_tokens(b, tree.num_nodes, max_tokens), reverse=True):
                self._graph(RaggedStep(t, tree), b)

    def ragged_shape(self, tree, seqs: list[ScheduledSeq]) -> Optional[tuple[RaggedStep, int]]:
        """(shape, batch bucket) of a step in which every sequence runs its pending token plus an
        adaptive tree of ``tree`` (or nothing more), if a captured graph holds it: the smallest
        token count of its batch bucket that fits. None otherwise."""
        b = padded_batch(len(seqs))
        if b is None or not seqs or any(len(s.token_ids) != 1 or len(s.block_table) > self.width for s in seqs):
            return None
        tokens = sum(1 + len(s.candidates) for s in seqs)
        counts = self._ragged_counts.get((tree, b), [])
        i = bisect.bisect_left(counts, tokens)
        if i < len(counts):
            return RaggedStep(counts[i], tree), b
        if self.sealed:  # start-up captured no graph this step fits: a bug, counted
            self.misses += 1
            return None
        return RaggedStep(tokens, tree), b  # (start-up's own steps, and the uncaptured CPU path)

    def run_ragged(self, shape: RaggedStep, batch: int, seqs: list[ScheduledSeq]) -> Optional[_RaggedGraph]:
        """Replay the ragged-step graph of ``shape`` at ``batch`` for the step (None: no graph)."""
        g = self._graph(shape, batch)
        if g is None:
            return None
        load_inputs(g.buf, g.layout.pack(seqs, self.pad_block))
        g.replay()
        return g

    def run_rows(self, key: Hashable, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
        """``fn(*inputs)`` for row-wise work (row i of the output depends on row i of each input
        only), replayed from a graph captured per (``key``, batch bucket of the rows) at
        start-up: the inputs ([n, ...] device tensors) are copied into static ones of the
        bucket's rows (padding rows keep what they held), and the output's first n rows come
        back (valid until the next replay of that graph). What a step decided on the host (a
        prefill, a mixed step, logprobs) still has to do on the device after its forward — the
        heads' proposal: ~65 small kernels, ~2.5 ms a step launched from Python on an H100."""
        n = inputs[0].shape[0]
        bucket = padded_batch(n)
        if bucket is None:
            return fn(*inputs)
        entry = self.row_graphs.get((key, bucket))
        if entry is None:
            if self.sealed:
                self.misses += 1
                return fn(*inputs)
            statics = [torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in inputs]
            work = lambda: fn(*statics)  # noqa: E731
            for static, x in zip(statics, inputs):
                static[:n].copy_(x)
            replay, _ = self._timed(lambda: _capture(self, work, read_at_start=False))  # (replayed next)
            entry = self.row_graphs[key, bucket] = (statics, replay, work)
        else:
            for static, x in zip(entry[0], inputs):
                static[:n].copy_(x)
        return entry[1]()[:n]

    def capture_rows(self, key: Hashable, fn: Callable[..., torch.Tensor], row_shapes: list[tuple],
                     dtypes: list[torch.dtype], max_rows: int) -> None:
        """Capture ``run_rows(key, fn, ...)`` for every batch bucket up to ``max_rows`` rows, on
        zero inputs of ``row_shapes`` (each input's shape past its first dimension)."""
        for b in sorted((b for b in BATCH_BUCKETS if b <= (padded_batch(max_rows) or BATCH_BUCKETS[-1])),
                        reverse=True):
            if (key, b) not in self.row_graphs:
                with torch.inference_mode():
                    self.run_rows(key, fn, [torch.zeros((b, *shape), dtype=dt, device=self.device)
                                            for shape, dt in zip(row_shapes, dtypes)])

    def run_tail(self, g, key: Hashable, tail: Tail, inputs: Optional[torch.Tensor] = None,
                 after: Optional[Hashable] = None) -> torch.Tensor:
        """After ``run``: ``tail`` on the graph's tensors (``GraphTensors``), replayed from a
        graph captured under ``key`` after g's forward (unless sealed; sealed and never
        captured, it runs eagerly and counts as a miss). ``inputs`` (a host tensor [b, k], b
        up to the graph's batch): per-sequence values the tail reads, copied before each run
        into a device buffer of the graph's batch (padding rows zero). ``after``: the key of
        the tail whose output this one reads (the proposal reads the decision)."""
        static = None
        if inputs is not None:
            static = g.tail_inputs.get(key)
            if static is None:
                static = g.tail_inputs[key] = torch.zeros((g.layout.batch, inputs.shape[1]), dtype=inputs.dtype,
                                                          device=self.device)
            padded = torch.zeros(static.shape, dtype=inputs.dtype)
            padded[:inputs.shape[0]] = inputs
            static.copy_(padded)
        work = lambda: tail(g.tensors(static, after))  # noqa: E731
        if key not in g.tails:
            if self.sealed:
                self.misses += 1
                g.tail_outputs[key] = out = work()
                return out
            replay, _ = self._timed(lambda: _capture(self, work, read_at_start=False))  # (replayed next)
            g.tails[key] = (replay, work)  # holding work keeps the tensors it reads alive
        g.tail_outputs[key] = out = g.tails[key][0]()
        return out
