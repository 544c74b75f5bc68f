"""Acceptance rules against direct, loop-based implementations of their formulas."""

import math
import random

import pytest
import torch

from engine.sampling import SamplingParams
from spec_decode.acceptance import accept
from spec_decode.tree import MedusaTree

TREES = ["mc_sim_7b_63", "small_12", "chain:3", [(0,), (1,), (0, 0), (1, 0), (1, 1), (0, 0, 0)]]


def _leaf_paths(tree: MedusaTree) -> list[list[int]]:
    out = []
    for leaf in range(tree.num_nodes):
        if tree.children[leaf]:
            continue
        path, j = [], leaf
        while j != -1:
            path.append(j)
            j = tree.parents[j]
        out.append(path[::-1])
    return out


def _case(tree: MedusaTree, vocab: int, seed: int):
    """Random logits plus candidates that often agree with the model (so paths get long)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tree.num_nodes, vocab, generator=gen) * 3
    order = torch.argsort(logits, dim=-1, descending=True)
    tokens = [int(torch.randint(vocab, (1,), generator=gen))]
    for i in range(1, tree.num_nodes):
        # The node's rank among siblings picks the parent's rank-th most likely token, mostly.
        rank = tree.choices[i - 1][-1]
        if torch.rand(1, generator=gen) < 0.8:
            tokens.append(int(order[tree.parents[i], rank]))
        else:
            tokens.append(int(torch.randint(vocab, (1,), generator=gen)))
    return torch.tensor(tokens), logits


@pytest.mark.parametrize("spec", TREES, ids=str)
def test_greedy_matches_loop(spec):
    tree = MedusaTree.build(spec, num_heads=4)
    greedy = SamplingParams(temperature=0)
    for seed in range(40):
        tokens, logits = _case(tree, 50, seed)
        best = []
        for path in _leaf_paths(tree):
            acc = [path[0]]
            for node in path[1:]:
                if int(tokens[node]) != int(logits[acc[-1]].argmax()):
                    break
                acc.append(node)
            if len(acc) > len(best):
                best = acc
        got = accept("greedy", tree, tokens, logits, greedy, seed=0, first_pos=10)
        assert [int(tokens[n]) for n in got.path] == [int(tokens[n]) for n in best]
        assert got.bonus == int(logits[best[-1]].argmax())


@pytest.mark.parametrize("spec", TREES, ids=str)
def test_typical_matches_loop(spec):
    tree = MedusaTree.build(spec, num_heads=4)
    eps, alpha, temp = 0.09, 0.3, 0.7
    params = SamplingParams(temperature=temp, seed=5)
    for seed in range(40):
        tokens, logits = _case(tree, 50, seed)
        best, best_key = None, None
        for path in _leaf_paths(tree):
            n, loglik = 0, 0.0
            for parent, node in zip(path, path[1:]):
                p = torch.softmax(logits[parent] / temp, -1)
                h = -sum(float(x) * math.log(max(float(x), 1e-10)) for x in p)
                px = float(p[tokens[node]])
                if not px > min(eps, alpha * math.exp(-h)):
                    break
                n += 1
                loglik += math.log(px)
            key = (n, loglik)
            if best_key is None or key[0] > best_key[0] or (key[0] == best_key[0] and key[1] > best_key[1] + 1e-9):
                best, best_key = path[: n + 1], key
        got = accept("typical", tree, tokens, logits, params, seed=5, first_pos=10, epsilon=eps, alpha=alpha)
        assert len(got.path) == len(best)
        assert [int(tokens[n]) for n in got.path] == [int(tokens[n]) for n in best]


def test_exact_match_rule_with_sampling_equals_plain_draws():
    """The greedy (exact-match) rule under temperature: tokens are the keyed plain draws."""
    from engine.sampling import processed_probs, sample_token

    tree = MedusaTree.build("small_12", num_heads=4)
    params = SamplingParams(temperature=1.0, seed=3)
    for seed in range(20):
        tokens, logits = _case(tree, 20, seed)
        got = accept("greedy", tree, tokens, logits, params, seed=seed, first_pos=7)
        # Walking the accepted path, each next token is what plain decoding draws there.
        produced = [int(tokens[n]) for n in got.path[1:]] + [got.bonus]
        for depth, node in enumerate(got.path):
            draw = sample_token(processed_probs(logits[node], params), params, seed, 7 + depth)
            assert produced[depth] == draw


@pytest.mark.parametrize("spec", TREES, ids=str)
def test_greedy_batch_equals_per_sequence(spec):
    from spec_decode.acceptance import accept_greedy_batch

    tree = MedusaTree.build(spec, num_heads=4)
    cases = [_case(tree, 50, seed) for seed in range(24)]
    toks = torch.stack([t for t, _ in cases])
    logits = torch.stack([l for _, l in cases])
    batch = accept_greedy_batch(tree, toks, logits)
    greedy = SamplingParams(temperature=0)
    for (t, l), got in zip(cases, batch):
        one = accept("greedy", tree, t, l, greedy, seed=0, first_pos=3)
        assert (got.path, got.bonus) == (one.path, one.bonus)
