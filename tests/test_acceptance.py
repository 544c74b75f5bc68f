"""Acceptance rules against direct, loop-based implementations of their formulas."""

import math

import pytest
import torch

from engine import SamplingParams
from engine.sample.acceptance import accept
from engine.spec.tree import MedusaTree

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
    from engine.sample.sampler import processed_probs, sample_token

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
    from engine.sample.acceptance import accept_greedy_batch

    tree = MedusaTree.build(spec, num_heads=4)
    cases = [_case(tree, 50, seed) for seed in range(24)]
    toks = torch.stack([t for t, _ in cases])
    logits = torch.stack([l for _, l in cases])
    batch = accept_greedy_batch(tree, toks, logits)
    greedy = SamplingParams(temperature=0)
    for (t, l), got in zip(cases, batch):
        one = accept("greedy", tree, t, l, greedy, seed=0, first_pos=3)
        assert (got.path, got.bonus) == (one.path, one.bonus)


@pytest.mark.parametrize("spec", TREES, ids=str)
@pytest.mark.parametrize("rule", ["greedy", "typical", "rejection"])
def test_device_rules_equal_the_host_rules_for_the_same_keys(spec, rule):
    """The batched device rules (what engine/sample/tail.py captures) against the per-sequence
    host rules, sequence by sequence: the same accepted path and produced tokens for the same
    logits and keys — sampled rows with their own temperature / top-k / top-p / seed beside
    greedy rows, in one batch. (tests/test_gpu.py runs it on CUDA too.)"""
    check_device_rules(spec, rule, torch.device("cpu"))


def check_device_rules(spec, rule: str, device: torch.device) -> None:
    """The registered rule as one unit: its device version (``AcceptanceRule.device``) over a
    batch against its host function per sequence."""
    from engine.sample.acceptance import ACCEPTANCE_RULES, BatchedVerify
    from engine.sample.sampler import params_rows, processed_probs_rows, seed_key

    tree = MedusaTree.build(spec, num_heads=4)
    vocab = 40
    cases = [tuple(x.to(device) for x in _case(tree, vocab, seed)) for seed in range(32)]
    params = [SamplingParams(temperature=0) if i % 5 == 0 else
              SamplingParams(temperature=[0.5, 0.7, 1.0, 1.3][i % 4], top_k=[0, 5, 0, 12][i % 4],
                             top_p=[1.0, 1.0, 0.8, 0.95][(i // 4) % 4], seed=1000 + i) for i in range(len(cases))]
    seeds = [123 + 7 * i for i in range(len(cases))]
    first_pos = [10 + 3 * i for i in range(len(cases))]
    tokens = torch.stack([t for t, _ in cases])  # [S, N]
    logits = torch.stack([lg for _, lg in cases])  # [S, N, V]

    def probs_of(rows):  # each sequence's rows with its own parameters
        r = rows.shape[1]
        out = processed_probs_rows(rows.flatten(0, 1), *params_rows([p for p in params for _ in range(r)], device))
        return out.view(len(cases), r, vocab)

    depths = torch.tensor(tree.depths, device=device)
    v = BatchedVerify(tree=tree, tokens=tokens, logits=logits,
                      positions=torch.tensor(first_pos, device=device)[:, None] + depths[None],
                      keys=torch.tensor([seed_key(s) for s in seeds], device=device),
                      temperature=torch.tensor([float(p.temperature) for p in params], device=device), filtered=True,
                      probs_of=probs_of, tree_tensor=lambda name: torch.as_tensor(getattr(tree, name), device=device),
                      epsilon=0.09, alpha=0.3, triton=False)
    path, n_acc, bonus = ACCEPTANCE_RULES[rule].device(v)
    lengths = []
    for i, (t, lg) in enumerate(cases):
        want = accept(rule, tree, t, lg, params[i], seeds[i], first_pos[i], epsilon=0.09, alpha=0.3)
        got = path[i, :int(n_acc[i]) + 1].tolist()
        assert (got, int(bonus[i])) == (want.path, want.bonus), (i, params[i])
        lengths.append(len(got))
    assert max(lengths) >= 3  # paths were accepted, not only roots


def test_keyed_uniforms_are_uniform_distinct_and_device_free():
    """Counter-based keys: the same (key, position, draw) gives the same number from ints or
    tensors, different draws/positions/keys differ, and the numbers look uniform."""
    from engine.sample.sampler import keyed_uniform, seed_key

    keys = torch.tensor([seed_key(s) for s in (0, 1, -1, 2 ** 63, 12345678901234)])
    assert len(set(keys.tolist())) == 5 and all(0 <= k < 2 ** 32 for k in keys.tolist())
    pos = torch.arange(4000)
    u = keyed_uniform(keys[:, None], pos[None], 0)
    assert u.shape == (5, 4000) and 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert float(keyed_uniform(keys[1:2], 17, 3)) == float(u.new_tensor(keyed_uniform(keys[1], pos[17], 3)))
    assert float(keyed_uniform(keys[1:2], 17, 3)) != float(keyed_uniform(keys[1:2], 17, 4))
    assert len(set(u.flatten().tolist())) > 19_990  # no repeats to speak of across keys and positions
