"""Head training (tiny model, learnable synthetic data), distillation determinism/resume,
tree construction from accuracies."""

import itertools
import json
import random

import pytest
import torch

from engine.engine import Engine
from engine.spec.heads import MedusaHeads
from engine.spec.tree import build_tree_from_accuracy, expected_accept_length, node_probability
from engine.training.train import TrainConfig, distill, head_loss, rank_accuracy, response_hidden_states, train_heads


def _pattern_examples(n: int, seed: int, pairs: bool = False) -> list[dict]:
    """Learnable synthetic responses: counting up by 7 (``pairs``: random tokens a, each
    followed by a + 7, so x_{t+2} is known from x_{t+1} but not from anything before it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if pairs:
            seq = [t for _ in range(20) for a in [rng.randrange(3, 249)] for t in (a, a + 7)]
        else:
            start = rng.randrange(3, 256)
            seq = [3 + (start - 3 + 7 * i) % 253 for i in range(40)]
        out.append({"prompt_ids": seq[:4], "response_ids": seq[4:]})
    return out


def test_training_learns_a_pattern_and_reloads(tiny_llama, tmp_path):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    data = response_hidden_states(eng.model, _pattern_examples(120, 0), eng.device, num_heads=2)
    assert len(data) == data.labels.shape[0] == data.roots.shape[0] == 120 * 36 and data.labels.shape[1] == 2
    heads = MedusaHeads(2, 1, eng.arch.hidden_size, eng.arch.vocab_size, shared_lm_head=False)
    lm_head = eng.model.lm_head
    before = rank_accuracy(heads, lm_head, data, eng.device)[0, 0].item()
    cfg = TrainConfig(out=str(tmp_path), epochs=8, lr=3e-3, batch_rows=256)
    train_heads(heads, lm_head, data, cfg, eng.device, ckpt=tmp_path / "ckpt.pt")
    after = rank_accuracy(heads, lm_head, data, eng.device)
    # Chance is 1/256; a random-weight backbone still carries the token identity.
    assert before < 0.05 and after[0, 0] > 0.5, (before, after[:, 0])
    heads.save(tmp_path / "heads")
    back = MedusaHeads.load(tmp_path / "heads", eng.arch.hidden_size, eng.arch.vocab_size)
    x = data.hidden[:8]
    with torch.no_grad():
        assert torch.allclose(back.logits(x, lm_head), heads.logits(x, lm_head))
    # Resume from the last checkpoint: nothing left to do, same weights.
    again = MedusaHeads(2, 1, eng.arch.hidden_size, eng.arch.vocab_size, shared_lm_head=False)
    train_heads(again, lm_head, data, cfg, eng.device, ckpt=tmp_path / "ckpt.pt")
    with torch.no_grad():
        assert torch.equal(again.logits(x, lm_head), heads.logits(x, lm_head))


def test_heads_that_read_the_path_learn_what_h_t_cannot_know(tiny_llama, tmp_path):
    """In 'a, a+7' pairs with random a, a token after an 'a' is known from that 'a' only.
    Head 0 (x_{t+2}): Medusa-1 stays near chance, heads that read the root x_{t+1} learn it.
    Head 1 (x_{t+3}): only sequential heads, which read x_{t+2} too, learn it."""
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    data = response_hidden_states(eng.model, _pattern_examples(150, 1, pairs=True), eng.device, num_heads=2)
    fresh = response_hidden_states(eng.model, _pattern_examples(40, 9, pairs=True), eng.device, num_heads=2)
    lm_head, embed_w = eng.model.lm_head, eng.model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(out=str(tmp_path), epochs=20, lr=1e-2, batch_rows=256, num_heads=2)
    acc = {}
    for kind in ("medusa", "root_conditioned", "sequential"):
        torch.manual_seed(0)
        heads = MedusaHeads(2, 1, eng.arch.hidden_size, eng.arch.vocab_size, shared_lm_head=False, kind=kind)
        train_heads(heads, lm_head, data, cfg, eng.device, embed_w=embed_w)
        acc[kind] = rank_accuracy(heads, lm_head, fresh, eng.device, embed_w=embed_w)[:, 0].tolist()
    # On unseen sequences half the rows are predictable from the right token, the other half
    # from nothing (a 1-layer head on 150 sequences gets part of the way). Chance: 1/256.
    assert acc["medusa"][0] < 0.05 and acc["root_conditioned"][0] > 0.2 and acc["sequential"][0] > 0.2, acc
    assert acc["medusa"][1] < 0.05 and acc["root_conditioned"][1] < 0.05 and acc["sequential"][1] > 0.2, acc
    heads.save(tmp_path / "seq")
    back = MedusaHeads.load(tmp_path / "seq", eng.arch.hidden_size, eng.arch.vocab_size)
    assert back.kind == "sequential"
    emb = torch.nn.functional.embedding(torch.stack([data.roots[:8], data.labels[:8, 0]], 1), embed_w)
    with torch.no_grad():
        assert torch.equal(back.logits(data.hidden[:8], lm_head, emb), heads.logits(data.hidden[:8], lm_head, emb))


def test_kl_loss_reads_the_teacher_at_t_plus_k_plus_1(tiny_llama):
    """loss='kl': head k at row r is compared with the base model's distribution at row
    r + k + 1 (the state that predicts its label), only where the label exists."""
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    data = response_hidden_states(eng.model, _pattern_examples(3, 2), eng.device, num_heads=3)
    heads = MedusaHeads(3, 1, eng.arch.hidden_size, eng.arch.vocab_size).randomize(0)
    lm_head = eng.model.lm_head
    idx = torch.arange(len(data))
    got, _ = head_loss(heads, lm_head, None, data, idx, decay=0.5, loss="kl")
    with torch.no_grad():
        student = torch.log_softmax(heads.logits(data.hidden, lm_head), -1)
        teacher = torch.log_softmax(lm_head(data.hidden).float(), -1)
        want = 0.0
        for k in range(3):
            terms = []
            for r in range(len(data)):
                if data.labels[r, k] != -100:
                    p = teacher[r + k + 1]
                    terms.append((p.exp() * (p - student[r, k])).sum())
            want += 0.5 ** k * torch.stack(terms).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


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
    from engine import SamplingParams

    heads = MedusaHeads(3, 1, 64, 256).randomize(0)
    heads.save(tmp_path / "h")
    acc = [[0.6, 0.2, 0.1] + [0.01] * 7, [0.4, 0.2] + [0.01] * 8, [0.3] + [0.01] * 9]
    (tmp_path / "h" / "tree.json").write_text(json.dumps({"rank_accuracy": acc}))
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=512, speculative={"heads": str(tmp_path / "h"), "tree": "auto"})
    rows = eng.tree_autotune
    assert [r["nodes"] for r in rows] == [1, 2, 4, 8, 16, 32, 63]
    chosen = eng.tree
    best = max(rows, key=lambda r: r["est_speedup"])
    assert chosen.num_nodes - 1 == best["nodes"]
    # Timed at batch 1 and 4 against plain decoding at the same batch.
    assert all(set(r["latency_ms"]) == set(r["plain_ms"]) == {"1", "4"} for r in rows)
    assert eng.scheduler.tree_depth == chosen.depth
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = Engine(str(tiny_llama), block_size=4, num_blocks=512)
    prompts = [[5, 6, 7], [9] * 12]
    assert [o.token_ids for o in eng.generate_batch(prompts, params)] == \
        [o.token_ids for o in plain.generate_batch(prompts, params)]
    with pytest.raises(ValueError, match="'auto' needs heads with a tree.json"):
        Engine(str(tiny_llama), speculative={"heads": "random", "tree": "auto"})


def test_whole_sources_are_held_out_of_training(tmp_path):
    """No prompt of a held-out source is ever a training prompt; the old random tenth of the
    other sources is neither trained on nor mixed into the held-out set; the three splits
    cover every row once; held-out rows come repository by repository, so any first n mix
    them; a file without sources falls back to the random split."""
    from engine.training.data import HELDOUT_SOURCES, SPLITS, is_heldout, read_prompts

    rows = [{"id": f"{repo.split('/')[0]}-{i}", "source": f"{repo}:data.jsonl", "prompt": f"{repo} prompt {i}"}
            for repo in ("a/trained", "b/trained", *HELDOUT_SOURCES[:2]) for i in range(40)]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    got = {split: [pid for pid, _ in read_prompts(f, split)] for split in SPLITS}
    source = {r["id"]: r["source"].split(":")[0] for r in rows}
    assert sorted(sum(got.values(), [])) == sorted(source)  # a partition
    assert all(source[pid] not in HELDOUT_SOURCES for pid in got["train"] + got["random_heldout"])
    assert {source[pid] for pid in got["heldout"]} == set(HELDOUT_SOURCES[:2])
    assert all(is_heldout(pid) for pid in got["random_heldout"]) and got["random_heldout"]
    first = [source[pid] for pid in got["heldout"][:4]]
    assert first[0] != first[1] and set(first) == set(HELDOUT_SOURCES[:2])
    bare = tmp_path / "bare.jsonl"
    bare.write_text("\n".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) for r in rows))
    assert [p for p, _ in read_prompts(bare, "heldout")] == [r["id"] for r in rows if is_heldout(r["id"])]
    with pytest.raises(ValueError, match="split"):
        list(read_prompts(f, "test"))


def test_the_data_directory_is_an_argument_with_a_clear_error(tmp_path, monkeypatch):
    """train-heads finds its prompts in --data-dir, else $MEDUSA_ENGINE_DATA, else ../shared/data
    beside a checkout; an installed package has none of them, and says which flag to pass."""
    import engine.training.data as data
    from engine.training.train import TrainConfig

    (tmp_path / "train_prompts.jsonl").write_text("")
    assert data.data_dir(str(tmp_path)) == tmp_path
    assert TrainConfig(out="x", data_dir=str(tmp_path)).prompts == str(tmp_path / "train_prompts.jsonl")
    monkeypatch.setenv("MEDUSA_ENGINE_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(ValueError, match="--data-dir = .* is not a directory"):
        data.data_dir(str(tmp_path / "nope"))
    monkeypatch.delenv("MEDUSA_ENGINE_DATA")
    monkeypatch.setattr(data, "CHECKOUT_DATA_DIR", tmp_path / "not-installed")
    with pytest.raises(ValueError, match="pass --data-dir DIR"):
        TrainConfig(out="x")
