"""Tensor parallelism: how a Llama-family model is split over ranks, and the collectives.

Megatron-style split: QKV and gate/up are column-parallel (each rank computes some heads / some
intermediate features), O and down are row-parallel (each rank's partial sum is all-reduced),
the embedding and lm_head are split over the vocabulary (the embedding all-reduces its masked
lookup, the lm_head all-gathers logits, so every rank holds identical full logits and makes the
same sampling and Medusa decisions).

Uneven splits are allowed, so models whose head count is not a multiple of the TP size (the
bundled SmolLM2 has 9 query heads, 3 KV heads) still run: query heads are cut into near-equal
contiguous ranges, and each rank keeps the KV heads its query heads read. When a rank's query
heads share their KV heads evenly (the usual case) it keeps each KV head once; otherwise it
keeps one KV head per query head (a replicated copy), which costs KV memory but keeps every
backend's uniform grouped-query layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine.core.shapes import cdiv
from engine.models.config import ArchConfig


def split_range(n: int, parts: int, rank: int) -> range:
    """Near-equal contiguous split of range(n): the first n % parts ranks get one more."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds (indices into the full model's heads, features and vocabulary)."""

    rank: int
    world_size: int
    q_heads: range
    kv_heads: tuple[int, ...]  # full-model KV head of each local KV head (repeats = replicated)
    intermediate: range
    vocab: range
    vocab_size: int  # the full vocabulary
    vocab_padded: int  # the largest rank's vocab slice (all-gather needs equal sizes)

    @classmethod
    def build(cls, arch: ArchConfig, world_size: int, rank: int) -> "ShardPlan":
        if world_size > arch.num_heads:
            raise ValueError(f"tensor_parallel_size: {world_size} ranks for {arch.num_heads} attention "
                             "heads; every rank needs at least one head")
        q = split_range(arch.num_heads, world_size, rank)
        group = arch.num_heads // arch.num_kv_heads
        kv_of_q = [h // group for h in q]
        unique = sorted(set(kv_of_q))
        even = all(kv_of_q.count(k) == len(q) // len(unique) for k in unique) and len(q) % len(unique) == 0
        kv = tuple(unique) if even else tuple(kv_of_q)
        return cls(rank=rank, world_size=world_size, q_heads=q, kv_heads=kv,
                   intermediate=split_range(arch.intermediate_size, world_size, rank),
                   vocab=split_range(arch.vocab_size, world_size, rank), vocab_size=arch.vocab_size,
                   vocab_padded=cdiv(arch.vocab_size, world_size))

    @classmethod
    def full(cls, arch: ArchConfig) -> "ShardPlan":
        return cls.build(arch, 1, 0)

    @property
    def num_q_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    def rows(self, name: str, arch: ArchConfig) -> Optional[tuple[int, list[int]]]:
        """(dim, full-tensor indices along dim) of this rank's slice of weight ``name``, or None
        when the weight is replicated (norms)."""
        d = arch.head_dim

        def heads(hs):
            return [h * d + i for h in hs for i in range(d)]

        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if leaf == "q_proj":
            return 0, heads(self.q_heads)
        if leaf in ("k_proj", "v_proj"):
            return 0, heads(self.kv_heads)
        if leaf == "o_proj":
            return (1, heads(self.q_heads)) if name.endswith("weight") else None
        if leaf in ("gate_proj", "up_proj"):
            return 0, list(self.intermediate)
        if leaf == "down_proj":
            return 1, list(self.intermediate)
        if leaf in ("embed_tokens", "lm_head"):
            return 0, list(self.vocab)
        return None


def shard_tensor(full: torch.Tensor, spec: Optional[tuple[int, list[int]]]) -> torch.Tensor:
    if spec is None:
        return full
    dim, idx = spec
    return full.index_select(dim, torch.tensor(idx, dtype=torch.long))


def read_shard(handle: Any, name: str, spec: Optional[tuple[int, list[int]]]) -> torch.Tensor:
    """Read only this rank's slice of ``name`` from a safetensors ``safe_open`` handle: one
    slice read per contiguous run of indices (replicated KV heads repeat a run)."""
    if spec is None:
        return handle.get_tensor(name)
    dim, idx = spec
    sl = handle.get_slice(name)
    runs, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            lo, hi = idx[start], idx[i - 1] + 1
            runs.append(sl[lo:hi] if dim == 0 else sl[:, lo:hi])
            start = i
    return runs[0] if len(runs) == 1 else torch.cat(runs, dim=dim)


class TPGroup:
    """The collectives the model uses; world_size 1 makes them no-ops (no process group)."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan
        self.world_size = plan.world_size

    @staticmethod
    def init_process_group(backend: str, address: str, port: int, rank: int, world_size: int,
                           timeout_s: float) -> None:
        # A bounded timeout: when a peer dies, the survivors' collectives fail instead of hanging.
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """[..., local vocab] on each rank → [..., full vocab] on every rank."""
        if self.world_size == 1:
            return local
        plan = self.plan
        pad = plan.vocab_padded - local.shape[-1]
        if pad:  # uneven vocab split: all_gather needs equal shapes
            local = torch.nn.functional.pad(local, (0, pad))
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        sizes = [len(split_range(plan.vocab_size, self.world_size, r)) for r in range(self.world_size)]
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (for decisions that must not diverge, e.g. timings)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
