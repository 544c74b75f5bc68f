"""Head training (tiny model, learnable synthetic data), distillation determinism/resume,
tree construction from accuracies."""

import itertools
import json
import random

import pytest
import torch

from engine.engine import Engine
from spec_decode.heads import MedusaHeads
from spec_decode.train import TrainConfig, distill, rank_accuracy, response_hidden_states, train_heads
from spec_decode.tree import build_tree_from_accuracy, expected_accept_length, node_probability


def test_training_learns_a_pattern_and_reloads(tiny_llama, tmp_path):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    # Deterministic pattern: each "response" counts up by 7 modulo the vocab (above specials).
    rng = random.Random(0)
    examples = []
    for _ in range(120):
        start = rng.randrange(3, 256)
        seq = [3 + (start - 3 + 7 * i) % 253 for i in range(40)]
        examples.append({"prompt_ids": seq[:4], "response_ids": seq[4:]})
    h, y = response_hidden_states(eng.model, examples, eng.device, num_heads=2)
    assert h.shape[0] == y.shape[0] == 120 * 36 and y.shape[1] == 2
    heads = MedusaHeads(2, 1, eng.arch.hidden_size, eng.arch.vocab_size, shared_lm_head=False)
    lm_head = eng.model.lm_head
    before = rank_accuracy(heads, lm_head, h, y, eng.device)[0, 0].item()
    cfg = TrainConfig(out=str(tmp_path), epochs=8, lr=3e-3, batch_rows=256)
    train_heads(heads, lm_head, h, y, cfg, eng.device, ckpt=tmp_path / "ckpt.pt")
    after = rank_accuracy(heads, lm_head, h, y, eng.device)
    # Chance is 1/256; a random-weight backbone still carries the token identity.
    assert before < 0.05 and after[0, 0] > 0.5, (before, after[:, 0])
    heads.save(tmp_path / "heads")
    back = MedusaHeads.load(tmp_path / "heads", eng.arch.hidden_size, eng.arch.vocab_size)
    x = h[:8]
    with torch.no_grad():
        assert torch.allclose(back.logits(x, lm_head), heads.logits(x, lm_head))
    # Resume from the last checkpoint: nothing left to do, same weights.
    again = MedusaHeads(2, 1, eng.arch.hidden_size, eng.arch.vocab_size, shared_lm_head=False)
    train_heads(again, lm_head, h, y, cfg, eng.device, ckpt=tmp_path / "ckpt.pt")
    with torch.no_grad():
        assert torch.equal(again.logits(x, lm_head), heads.logits(x, lm_head))


def test_distillation_is_deterministic_and_resumable(tiny_llama, tmp_path):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    rows = [(f"p{i}", " ".join(f"w{3 + (i * 5 + j) % 200}" for j in range(3 + i % 4))) for i in range(6)]
    a = distill(eng, rows, tmp_path / "a.jsonl", 8, 0.8, seed=1, batch=4, chat=False)
    # Interrupted run: only the first 3 rows were written; the rest are generated on resume.
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:3]) + "\n")
    b = distill(eng, rows, tmp_path / "b.jsonl", 8, 0.8, seed=1, batch=4, chat=False)
    assert a == b and len((tmp_path / "b.jsonl").read_text().splitlines()) == 6
    c = distill(eng, rows, tmp_path / "c.jsonl", 8, 0.8, seed=2, batch=4, chat=False)
    assert c != a
    assert all(json.loads(line)["id"] for line in lines)
    with pytest.raises(ValueError, match="no chat template"):
        distill(eng, rows, tmp_path / "d.jsonl", 8, 0.8, seed=1, batch=4, chat=True)


def _brute_force_best(acc, budget):
    k, r = len(acc), len(acc[0])
    universe = [c for d in range(1, k + 1) for c in itertools.product(range(r), repeat=d)]
    best = 0.0
    for subset in itertools.combinations(universe, budget):
        s = set(subset)
        if all(len(c) == 1 or c[:-1] in s for c in subset):
            best = max(best, expected_accept_length(subset, acc))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_tree_from_accuracy_matches_brute_force(seed):
    rng = random.Random(seed)
    acc = [sorted((rng.random() * 0.6 for _ in range(3)), reverse=True) for _ in range(3)]
    for budget in (1, 2, 3, 4, 5):
        tree = build_tree_from_accuracy(acc, budget)
        assert tree.num_nodes == budget + 1
        got = expected_accept_length(tree.choices, acc)
        assert got == pytest.approx(_brute_force_best(acc, budget))
    assert node_probability((0, 1), acc) == pytest.approx(acc[0][0] * acc[1][1])


def test_tree_auto_times_sizes_and_stays_lossless(tiny_llama, tmp_path):
    from engine.sampling import SamplingParams

    heads = MedusaHeads(3, 1, 64, 256).randomize(0)
    heads.save(tmp_path / "h")
    acc = [[0.6, 0.2, 0.1] + [0.01] * 7, [0.4, 0.2] + [0.01] * 8, [0.3] + [0.01] * 9]
    (tmp_path / "h" / "tree.json").write_text(json.dumps({"rank_accuracy": acc}))
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512, speculative={"heads": str(tmp_path / "h"), "tree": "auto"})
    rows = eng.tree_autotune
    assert [r["nodes"] for r in rows] == [1, 2, 4, 8, 16, 32, 63]
    chosen = eng.tree
    best = max(rows, key=lambda r: r["expected_tokens_per_s"])
    assert chosen.num_nodes - 1 == best["nodes"]
    assert eng.scheduler.tree_depth == chosen.depth
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    prompts = [[5, 6, 7], [9] * 12]
    assert [o.token_ids for o in eng.generate_batch(prompts, params)] == \
        [o.token_ids for o in plain.generate_batch(prompts, params)]
    with pytest.raises(ValueError, match="'auto' needs heads with a tree.json"):
        Engine(str(tiny_llama), speculative={"heads": "random", "tree": "auto"})
