"""Medusa heads: checkpoint layout round trip, .pt variant, clear errors."""

import json

import pytest
import torch

from spec_decode.heads import MedusaHeads


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

    from spec_decode.heads import export_vllm, load_vllm

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
