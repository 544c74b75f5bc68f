"""Medusa heads: checkpoint layout round trip, .pt variant, clear errors."""

import json

import pytest
import torch

from engine.spec.heads import MedusaHeads


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_same_logits(tmp_path, shared):
    heads = MedusaHeads(3, 2, hidden_size=16, vocab_size=40, shared_lm_head=shared).randomize(0)
    lm_head = torch.nn.Linear(16, 40, bias=False)
    heads.save(tmp_path / "h", base_model="tiny")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == 2
    back = MedusaHeads.load(tmp_path / "h", 16, 40)
    x = torch.randn(5, 16)
    assert torch.equal(heads.logits(x, lm_head), back.logits(x, lm_head))
    keys = set(heads.state_dict_medusa())
    assert "0.0.linear.weight" in keys and "2.1.linear.bias" in keys
    assert ("0.2.weight" in keys) == (not shared)


def test_pt_checkpoint_and_errors(tmp_path):
    heads = MedusaHeads(2, 1, hidden_size=8, vocab_size=10, shared_lm_head=False).randomize(1)
    d = tmp_path / "pt"
    d.mkdir()
    torch.save(heads.state_dict_medusa(), d / "medusa_lm_head.pt")
    (d / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    back = MedusaHeads.load(d, 8, 10)
    x = torch.randn(2, 8)
    assert torch.equal(back.logits(x, None), heads.logits(x, None))
    with pytest.raises(ValueError, match=r"weight 0.0.linear.weight has shape \(8, 8\).*hidden_size=16"):
        MedusaHeads.load(d, 16, 10)
    with pytest.raises(ValueError, match="has no config.json"):
        MedusaHeads.load(tmp_path, 8, 10)


@pytest.mark.parametrize("shared", [True, False])
def test_vllm_layout_round_trip(tmp_path, shared):
    from safetensors.torch import load_file

    from engine.spec.heads import export_vllm, load_vllm

    heads = MedusaHeads(3, 1, hidden_size=16, vocab_size=40, shared_lm_head=shared).randomize(4)
    lm_head = torch.nn.Linear(16, 40, bias=False)
    export_vllm(heads, tmp_path / "v", lm_head.weight if shared else None)
    keys = set(load_file(str(tmp_path / "v" / "model.safetensors")))
    assert "blocks.2.layers.0.bias" in keys and ("lm_heads.2.weight" in keys) == (not shared)
    back, lm_w = load_vllm(tmp_path / "v")
    x = torch.randn(4, 16)
    if shared:
        assert torch.equal(lm_w, lm_head.weight.detach())
    with torch.no_grad():
        assert torch.equal(back.logits(x, lm_head), heads.logits(x, lm_head))
    # And back into the FasterDecoding layout that the engine loads.
    back.save(tmp_path / "fd")
    again = MedusaHeads.load(tmp_path / "fd", 16, 40)
    with torch.no_grad():
        assert torch.equal(again.logits(x, lm_head), heads.logits(x, lm_head))
    with pytest.raises(ValueError, match="need the base model's lm_head"):
        export_vllm(MedusaHeads(1, 1, 16, 40, shared_lm_head=True), tmp_path / "w")


def test_root_conditioned_heads_round_trip_and_refuse_vllm_export(tmp_path):
    from engine.spec.heads import export_vllm

    heads = MedusaHeads(3, 2, hidden_size=16, vocab_size=40, kind="root_conditioned").randomize(2)
    heads.save(tmp_path / "h")
    back = MedusaHeads.load(tmp_path / "h", 16, 40)
    assert back.kind == "root_conditioned"
    lm_head = torch.nn.Linear(16, 40, bias=False)
    x, e = torch.randn(4, 16), torch.randn(4, 1, 16)  # root-conditioned: the path is the root
    with torch.no_grad():
        assert torch.equal(back.logits(x, lm_head, e), heads.logits(x, lm_head, e))
        # The root matters: another root, other logits.
        assert not torch.equal(back.logits(x, lm_head, e), back.logits(x, lm_head, e + 1))
    with pytest.raises(ValueError, match="root token"):
        back.logits(x, lm_head)
    with pytest.raises(ValueError, match="no root_conditioned heads"):
        export_vllm(heads, tmp_path / "v", lm_head.weight)
    # A checkpoint whose config says Medusa-1 but carries root weights is refused, not half-loaded.
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["medusa_head_kind"] = "medusa"
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not describe"):
        MedusaHeads.load(tmp_path / "h", 16, 40)


def _reference_candidates(heads, lm_head, embed, tree, x, roots, vocab):
    """Node by node, from the heads' own (teacher-forcing) logits: a node's candidate is its
    rank among head d-1's top-k given the tokens on its path (only the root for
    root-conditioned heads, nothing for Medusa-1)."""
    k = heads.num_heads
    tokens = [[int(r)] for r in roots]  # per sequence, node order
    for i in range(1, tree.num_nodes):
        d, rank, parent = tree.depths[i], tree.choices[i - 1][-1], tree.parents[i]
        for s in range(len(roots)):
            path, j = [], parent
            while j != -1:
                path.append(tokens[s][j])
                j = tree.parents[j]
            path = path[::-1] + [0] * (k - len(path))  # root first; heads read only their share
            emb = embed(torch.tensor(path))[None] if heads.kind != "medusa" else None
            logits = heads.logits(x[s:s + 1], lm_head, emb)[0, d - 1]
            if vocab is not None:
                ids = torch.tensor(vocab)[torch.topk(logits[vocab], tree.topk).indices]
            else:
                ids = torch.topk(logits, tree.topk).indices
            tokens[s].append(int(ids[rank]))
    return torch.tensor([t[1:] for t in tokens])


def test_proposer_matches_the_heads_logits():
    """The proposer's stacked GEMMs, depth-by-depth sequential pass and proposal-vocabulary
    projection give the candidates the heads' own logits give."""
    from engine.spec.proposer import MedusaProposer
    from engine.spec.tree import MedusaTree

    torch.manual_seed(0)
    tree = MedusaTree.build([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], 3)
    for kind in ("medusa", "root_conditioned", "sequential"):
        for shared in (True, False):
            heads = MedusaHeads(3, 2, hidden_size=16, vocab_size=40, shared_lm_head=shared, kind=kind).randomize(3)
            heads = heads.double()
            with torch.no_grad():
                for p in heads.path_proj.parameters() if heads.path_proj is not None else []:
                    p.mul_(50)  # the path must matter
            lm_head = torch.nn.Linear(16, 40, bias=False).double()
            embed = torch.nn.Embedding(40, 16).double()
            x, roots = torch.randn(5, 16, dtype=torch.float64), torch.tensor([1, 5, 7, 9, 11])
            with torch.no_grad():
                for vocab in (None, [3, 7, 8, 12, 20, 21, 30, 39]):
                    got = MedusaProposer(heads, tree, lm_head, embed, vocab).propose(x, roots)
                    want = _reference_candidates(heads, lm_head, embed, tree, x, roots, vocab)
                    assert torch.equal(got, want), (kind, shared, vocab)


def test_benchmark_random_heads_load_like_trained_ones(tmp_path):
    """benchmarks/dummy_model.py --heads: random heads for a model directory, in the layout
    train-heads writes (the engine loads them as it loads trained heads), with the proposal
    vocabulary asked for; a proposal vocabulary larger than the model's is refused."""
    from benchmarks.dummy_model import write_random_heads
    from engine.spec.proposer import read_proposal_vocab

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 32, "vocab_size": 300}))
    out = write_random_heads(model, tmp_path / "heads", num_heads=3, num_layers=2, kind="sequential",
                             proposal_vocab=64)
    heads = MedusaHeads.load(out, 32, 300)
    assert (heads.num_heads, heads.num_layers, heads.kind, heads.shared_lm_head) == (3, 2, "sequential", True)
    assert all(p.abs().sum() > 0 for p in heads.parameters())  # random, not the zero init
    assert read_proposal_vocab(out, 300) == list(range(64))
    none = write_random_heads(model, tmp_path / "full", num_heads=2, num_layers=1, kind="medusa", proposal_vocab=0)
    assert read_proposal_vocab(none, 300) is None
    with pytest.raises(ValueError, match="proposal_vocab"):
        write_random_heads(model, tmp_path / "bad", num_heads=2, num_layers=1, kind="medusa", proposal_vocab=301)
