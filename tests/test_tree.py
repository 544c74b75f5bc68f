"""Tree metadata agrees with xformers' TreeAttnMetadata; invalid trees raise."""

import random

import pytest
import torch
from xformers.ops.tree_attention import TreeAttnMetadata

from engine.spec.tree import PRESETS, MedusaTree


def _random_tree(rng: random.Random, n: int, depth: int, topk: int) -> list[tuple[int, ...]]:
    nodes: set[tuple[int, ...]] = set()
    n = min(n, sum(topk ** d for d in range(1, depth + 1)))
    while len(nodes) < n:
        parent = rng.choice([()] + [c for c in nodes if len(c) < depth])
        nodes.add(parent + (rng.randrange(topk),))
    return list(nodes)


def _check_against_xformers(tree: MedusaTree):
    meta = TreeAttnMetadata.from_tree_choices(list(tree.choices))
    assert torch.equal(meta.attention_bias == 0, tree.mask)
    assert meta.tree_seq_position_ids.tolist() == tree.depths
    # Same set of root-to-leaf paths (xformers leaves them unsorted).
    ours = sorted(tuple(r) for r in tree.paths.tolist())
    theirs = sorted(tuple(r) for r in meta.retrieval_indices.tolist())
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(PRESETS) + ["chain:1", "chain:4"])
def test_presets_match_xformers(name):
    tree = MedusaTree.build(name, num_heads=5)
    _check_against_xformers(tree)
    if name == "mc_sim_7b_63":
        assert tree.num_nodes == 64 and tree.depth == 4 and tree.topk == 10


def test_random_trees_match_xformers():
    rng = random.Random(0)
    for _ in range(30):
        choices = _random_tree(rng, rng.randint(1, 40), depth=rng.randint(1, 5), topk=rng.randint(1, 6))
        tree = MedusaTree.build(choices, num_heads=5)
        _check_against_xformers(tree)
        # Every node's candidate comes from head depth-1 at rank = its last choice.
        assert tree.node_head.tolist() == [len(c) - 1 for c in tree.choices]


@pytest.mark.parametrize("choices, msg", [
    ([(0,), (1, 0)], r"node \(1, 0\) has no parent \(1,\)"),
    ([(0,), (0, 0), (0, 0, 0)], "depth 3 but there are only 2 heads"),
    ([(0,), (10,)], "beyond the heads' top-10"),
    ([(0,), (0,)], "listed twice"),
    ([], "at least one node"),
    ("mc_sim_unknown", "unknown preset"),
    ("chain:x", "chain:K"),
])
def test_invalid_trees(choices, msg):
    with pytest.raises(ValueError, match=msg):
        MedusaTree.build(choices, num_heads=2)
