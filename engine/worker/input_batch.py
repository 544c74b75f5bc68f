"""One step's inputs on the worker, flattened (``InputBatch``), and the asynchronous copies of
its results to the host (``HostCopy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.attention.base import SeqAttn
from engine.attention.kv_cache import PagedKVCache
from engine.core.outputs import ScheduledSeq, SchedulerOutput
from engine.spec.tree import MedusaTree


@dataclass
class InputBatch:
    """One step, flattened: sequence after sequence, each its input tokens then its tree's
    candidates."""
    out: SchedulerOutput
    # The tree this step's decoding sequences verify, when they all verify the same one (None
    # with adaptive trees of their own: ``seq_trees``).
    tree: Optional[MedusaTree]
    ids: list[int]
    offsets: list[int]  # first flat row of each sequence
    # Filled by ``locate`` (steps that are not a decode or verify graph's):
    positions: list[int]
    slots: list[int]  # where each token's K/V is written (tree nodes: the scratch region)
    attn: list[SeqAttn]
    # Query tokens per sequence when every sequence runs one pending token plus the same
    # tree (or nothing more): the step has a fixed shape. None otherwise.
    uniform_nodes: Optional[int]
    # Every sequence's tree (None: it verifies none).
    seq_trees: list[Optional[MedusaTree]]

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.out.seqs

    @classmethod
    def build(cls, out: SchedulerOutput, trees: dict[int, MedusaTree], scratch_tokens: int,
              tree_of_nodes: Optional[Callable[[tuple[int, ...]], MedusaTree]] = None) -> "InputBatch":
        """The step's flat ids and its shape; ValueError for a step the worker cannot run (trees of
        several sizes from the tree set, a tree not in ``trees``, adaptive trees without
        ``tree_of_nodes`` — the full tree cut down to a sequence's ``tree_nodes`` — more tree
        tokens than the K/V scratch region holds)."""
        sizes = {s.tree_size for s in out.seqs if s.tree_size and not s.tree_nodes}
        if len(sizes) > 1 or not sizes <= trees.keys():
            raise ValueError(f"step {out.step_id}: trees {sorted(sizes)} do not fit the engine's "
                             f"trees {sorted(trees)} (one tree per step)")
        if tree_of_nodes is None and any(s.tree_nodes for s in out.seqs):
            raise ValueError(f"step {out.step_id}: adaptive trees (tree_nodes), but the worker has no full tree")
        seq_trees = [tree_of_nodes(tuple(s.tree_nodes)) if s.tree_nodes else trees[s.tree_size] if s.tree_size
                     else None for s in out.seqs]
        distinct = {id(t): t for t in seq_trees if t is not None}
        if sizes and len(distinct) > 1:
            raise ValueError(f"step {out.step_id}: a tree of the tree set beside adaptive trees")
        tree = next(iter(distinct.values())) if len(distinct) == 1 else None
        batch = cls(out=out, tree=tree, ids=[], offsets=[], positions=[], slots=[], attn=[], uniform_nodes=None,
                    seq_trees=seq_trees)
        for s in out.seqs:
            n = len(s.token_ids)
            if s.tree_size and (n != 1 or len(s.candidates) != s.tree_size):
                raise ValueError(f"seq {s.seq_id}: a {s.tree_size}-candidate tree follows exactly one pending token "
                                 f"and has {s.tree_size} candidates, got {n} tokens and {len(s.candidates)}")
            batch.offsets.append(len(batch.ids))
            batch.ids += s.token_ids
            if s.tree_size:
                batch.ids += s.candidates
        if distinct and len(batch.ids) > scratch_tokens:
            raise ValueError(f"step {out.step_id}: {len(batch.ids)} tokens exceed the K/V scratch region "
                             f"({scratch_tokens})")
        if all(len(s.token_ids) == 1 for s in out.seqs) and len({id(t) for t in seq_trees}) == 1:
            batch.uniform_nodes = out.seqs[0].tree_size + 1 if out.seqs else None
        return batch

    def locate(self, kv_cache: PagedKVCache) -> None:
        """Every token's position, K/V slot (tree candidates: their rows of the scratch region)
        and the attention inputs of each sequence."""
        scratch = kv_cache.scratch_slot0
        for s, row, tree in zip(self.seqs, self.offsets, self.seq_trees):
            n = len(s.token_ids)
            self.positions += range(s.start_pos, s.start_pos + n)
            self.slots += kv_cache.host_slots(s.block_table, s.start_pos, n)
            if s.tree_size:
                self.positions += [s.start_pos + d for d in tree.depths[1:]]
                self.slots += range(scratch + row + n, scratch + row + n + s.tree_size)
            self.attn.append(SeqAttn(q_len=n + s.tree_size, ctx_len=s.start_pos, block_table=s.block_table,
                                     tree_mask=tree.mask if s.tree_size else None))


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
