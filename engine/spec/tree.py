"""Medusa candidate trees.

A tree is a list of choice tuples as in FasterDecoding/Medusa's ``medusa_choices.py``: the node
``(a, b, c)`` takes the a-th guess of head 0, then the b-th of head 1, then the c-th of head 2.
Node 0 is the root: the base model's own next token. Nodes are ordered by depth, then choice,
which is also the order of ``xformers.ops.tree_attention.TreeAttnMetadata`` (tests check that
the mask, positions and paths here agree with it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional, Sequence, Union

import torch

# Max top-k a head provides to a tree (Medusa's TOPK).
MAX_TOPK = 10

# Node budgets that tree="auto" times and back-off nests in the full tree (mc_sim_7b_63's size last).
AUTO_TREE_SIZES = (1, 2, 4, 8, 16, 32, 63)

# Tree of FasterDecoding/Medusa (medusa/model/medusa_choices.py, Apache-2.0), tuned there for
# Vicuna-7B; 63 nodes + root, depth 4.
MC_SIM_7B_63 = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3),
    (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0),
    (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
]

# A small tree for CPUs and large batches: 2 guesses at depth 1 and 2, one at 3 and 4.
SMALL_12 = [
    (0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0),
    (0, 0, 1), (2,),
]

PRESETS: dict[str, list[tuple[int, ...]]] = {"mc_sim_7b_63": MC_SIM_7B_63, "small_12": SMALL_12}


def chain(k: int) -> list[tuple[int, ...]]:
    """Top-1 of each of k heads: a single path."""
    return [(0,) * d for d in range(1, k + 1)]


TreeSpec = Union[str, Sequence[Sequence[int]]]


def resolve_choices(spec: TreeSpec) -> list[tuple[int, ...]]:
    if isinstance(spec, str):
        if spec.startswith("chain:"):
            try:
                k = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"tree: {spec!r}: expected 'chain:K' with an integer K") from None
            if k < 1:
                raise ValueError(f"tree: {spec!r}: K must be >= 1")
            return chain(k)
        if spec not in PRESETS:
            raise ValueError(f"tree: unknown preset {spec!r}; known: {sorted(PRESETS)} or 'chain:K'")
        return list(PRESETS[spec])
    return [tuple(int(c) for c in choice) for choice in spec]


@dataclass(frozen=True)
class MedusaTree:
    # Sorted choice tuples; node i+1 is choices[i], node 0 is the root.
    choices: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, spec: TreeSpec, num_heads: int) -> "MedusaTree":
        choices = resolve_choices(spec)
        if not choices:
            raise ValueError("tree: must have at least one node besides the root")
        seen = set()
        for c in choices:
            if len(c) == 0:
                raise ValueError("tree: the empty tuple is the root and must not be listed")
            if c in seen:
                raise ValueError(f"tree: node {c} is listed twice")
            seen.add(c)
        for c in choices:
            if len(c) > 1 and c[:-1] not in seen:
                raise ValueError(f"tree: node {c} has no parent {c[:-1]} in the tree")
            if len(c) > num_heads:
                raise ValueError(f"tree: node {c} has depth {len(c)} but there are only {num_heads} heads")
            if any(not 0 <= r < MAX_TOPK for r in c):
                raise ValueError(f"tree: node {c} asks for a guess beyond the heads' top-{MAX_TOPK}")
        return cls(tuple(sorted(choices, key=lambda c: (len(c), c))))

    @property
    def num_nodes(self) -> int:
        """Including the root."""
        return len(self.choices) + 1

    @property
    def depth(self) -> int:
        return max(len(c) for c in self.choices)

    @cached_property
    def parents(self) -> list[int]:
        index = {c: i + 1 for i, c in enumerate(self.choices)}
        return [-1] + [index.get(c[:-1], 0) for c in self.choices]

    @cached_property
    def depths(self) -> list[int]:
        return [0] + [len(c) for c in self.choices]

    @cached_property
    def node_head(self) -> torch.Tensor:
        """Per non-root node: which head guesses it (depth - 1)."""
        return torch.tensor([len(c) - 1 for c in self.choices], dtype=torch.long)

    @cached_property
    def node_rank(self) -> torch.Tensor:
        """Per non-root node: which of its head's top-k guesses it takes."""
        return torch.tensor([c[-1] for c in self.choices], dtype=torch.long)

    @cached_property
    def topk(self) -> int:
        return max(c[-1] for c in self.choices) + 1

    @cached_property
    def children(self) -> list[list[int]]:
        """Children of every node, in the order of their guess rank."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            kids[self.parents[i]].append(i)
        for k in kids:
            k.sort(key=lambda n: self.choices[n - 1][-1])
        return kids

    @cached_property
    def children_table(self) -> torch.Tensor:
        """[N, most children] the children of every node in rank order, padded with -1."""
        width = max(len(k) for k in self.children)
        return torch.tensor([k + [-1] * (width - len(k)) for k in self.children], dtype=torch.long)

    @cached_property
    def parent_nodes(self) -> list[int]:
        """The nodes that have children (whose rows a typical decision reads), in node order."""
        return [i for i in range(self.num_nodes) if self.children[i]]

    @cached_property
    def parent_row(self) -> list[int]:
        """Every node's index in ``parent_nodes`` (0 for a leaf: never read as a parent)."""
        row = [0] * self.num_nodes
        for r, node in enumerate(self.parent_nodes):
            row[node] = r
        return row

    @cached_property
    def node_paths(self) -> list[list[int]]:
        """For every node, the node ids from the root down to it (root first, itself last)."""
        out = []
        for i in range(self.num_nodes):
            path, j = [], i
            while j != -1:
                path.append(j)
                j = self.parents[j]
            out.append(path[::-1])
        return out

    @cached_property
    def mask(self) -> torch.Tensor:
        """[N, N] bool: node i may attend to node j iff j is i or an ancestor of i."""
        n = self.num_nodes
        m = torch.zeros(n, n, dtype=torch.bool)
        for i, path in enumerate(self.node_paths):
            m[i, path] = True
        return m

    @cached_property
    def paths(self) -> torch.Tensor:
        """[num_leaves, depth + 1] node ids from the root to every leaf, padded with -1."""
        leaves = [i for i in range(self.num_nodes) if not self.children[i]]
        rows = [self.node_paths[leaf] + [-1] * (self.depth + 1 - len(self.node_paths[leaf])) for leaf in leaves]
        return torch.tensor(rows, dtype=torch.long)


# ---- trees from measured head accuracy ------------------------------------------------

def node_probability(choice: Sequence[int], acc: Sequence[Sequence[float]]) -> float:
    """P(the path to this node is accepted), heads assumed independent (Medusa paper):
    the product of acc[depth][rank] along the path (0 where acc has no such rank)."""
    p = 1.0
    for depth, rank in enumerate(choice):
        p *= acc[depth][rank] if depth < len(acc) and rank < len(acc[depth]) else 0.0
    return p


def expected_accept_length(choices: Sequence[Sequence[int]], acc: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step: the bonus token plus every node's chance to be on the
    accepted path (at most one node per depth can be, siblings guess distinct tokens)."""
    return 1.0 + sum(node_probability(c, acc) for c in choices)


def build_tree_from_accuracy(acc: Sequence[Sequence[float]], budget: int) -> MedusaTree:
    """The tree of ``budget`` nodes with the highest expected accepted length: greedy expansion,
    always adding the frontier node with the highest acceptance probability. A child's
    probability never exceeds its parent's, so the chosen set is the top-``budget`` nodes of
    the whole candidate space: optimal for this objective."""
    import heapq

    num_heads, topk = len(acc), min(MAX_TOPK, len(acc[0]))
    if budget < 1:
        raise ValueError(f"tree budget: expected >= 1, got {budget}")
    frontier = [(-acc[0][r], (r,)) for r in range(topk)]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < budget:
        neg_p, node = heapq.heappop(frontier)
        chosen.append(node)
        if len(node) < num_heads:
            for r in range(topk):
                heapq.heappush(frontier, (neg_p * acc[len(node)][r], node + (r,)))
    return MedusaTree.build(chosen, num_heads)


# ---- back-off: smaller trees nested in the engine's tree ------------------------------

@dataclass(frozen=True)
class SubTree:
    tree: MedusaTree
    # For each of the sub-tree's candidates, its index among the full tree's candidates (so a
    # sequence's full candidate list is cut down with ``[cands[i] for i in nodes]``).
    nodes: tuple[int, ...]

    @classmethod
    def of(cls, full: MedusaTree, nodes: Sequence[int]) -> "SubTree":
        """The sub-tree of ``full`` made of these candidates (in the sub-tree's node order)."""
        return cls(MedusaTree(tuple(full.choices[i] for i in nodes)), tuple(nodes))


class CutTrees:
    """The full tree cut down to sets of its candidates (adaptive trees: a sequence's
    ``ScheduledSeq.tree_nodes``), each made once by ``SubTree.of`` after its node set is
    checked, and kept in an LRU of ``capacity`` (each tree holds its mask and paths); the
    ``fixed`` trees (the tree set's) answer for their own node sets and are never evicted."""

    def __init__(self, full: MedusaTree, fixed: Iterable[MedusaTree] = (), capacity: int = 4096) -> None:
        self.full, self.capacity = full, capacity
        index = {c: i for i, c in enumerate(full.choices)}
        self._fixed = {tuple(index[c] for c in t.choices): t for t in fixed}
        self._made: OrderedDict[tuple[int, ...], MedusaTree] = OrderedDict()

    def get(self, nodes: tuple[int, ...]) -> MedusaTree:
        """The tree of these candidates (indices among the full tree's, ascending, closed under
        parents); ValueError for a set that is not."""
        tree = self._fixed.get(nodes)
        if tree is not None:
            return tree
        tree = self._made.pop(nodes, None)
        if tree is None:
            choices = self.full.choices
            if any(not 0 <= i < len(choices) for i in nodes) or list(nodes) != sorted(set(nodes)):
                raise ValueError(f"tree_nodes {list(nodes)}: not ascending candidates of the full tree")
            taken = {choices[i] for i in nodes}
            if any(len(c) > 1 and c[:-1] not in taken for c in taken):
                raise ValueError(f"tree_nodes {list(nodes)}: not closed under parents")
            tree = SubTree.of(self.full, nodes).tree
            if len(self._made) >= self.capacity:
                self._made.popitem(last=False)
        self._made[nodes] = tree
        return tree


def nested_subtrees(full: MedusaTree, acc: Optional[Sequence[Sequence[float]]],
                    sizes: Sequence[int]) -> dict[int, SubTree]:
    """For each size n (candidates, < the full tree's), the n nodes of ``full`` most likely to be
    accepted (by ``acc``; without accuracies: shallowest first). A child is never likelier than
    its parent, so every sub-tree is closed under parents; they nest, and the full tree is
    included under its own size."""
    def key(c):
        return (-node_probability(c, acc), len(c), c) if acc is not None else (len(c), c)

    ranked = sorted(full.choices, key=key)
    index = {c: i for i, c in enumerate(full.choices)}
    out = {len(full.choices): SubTree(full, tuple(range(len(full.choices))))}
    for n in sizes:
        if 0 < n < len(full.choices):
            tree = MedusaTree(tuple(sorted(ranked[:n], key=lambda c: (len(c), c))))
            out[n] = SubTree(tree, tuple(index[c] for c in tree.choices))
    return dict(sorted(out.items()))
