"""The CPU projections: every projection and the lm_head carry a oneDNN-blocked copy of their
weight (float32), used for 4-64 rows; whatever the row count, ``linear`` computes what
``F.linear`` does, and a row's result does not depend on the rows beside it beyond rounding."""

import pytest
import torch

from engine.models.llama import CPU_BLOCKED_ROWS, cpu_bf16_gemm_available, linear
from engine.models.loader import load_model


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_blocked_weights_compute_what_the_plain_gemm_does(tiny_llama):
    model, _ = load_model(tiny_llama, torch.float32, torch.device("cpu"))
    layers = [model.lm_head] + [m for layer in model.model.layers
                                for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(getattr(m, "cpu_blocked_weight", None) is not None for m in layers)
    torch.manual_seed(0)
    lo, hi = CPU_BLOCKED_ROWS
    for m in layers:
        x = torch.randn(hi + 1, m.in_features)
        for rows in (1, 3, lo, 17, hi, hi + 1):
            got = linear(m, x[:rows])
            torch.testing.assert_close(got, torch.nn.functional.linear(x[:rows], m.weight), rtol=1e-5, atol=1e-5)
            # The first row alone and among others: the same up to rounding.
            torch.testing.assert_close(got[:1], linear(m, x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_bf16_projections_give_a_row_the_same_bits_whatever_the_rows_beside_it(tiny_llama):
    """bfloat16 (where oneDNN has a bf16 kernel): every row count through the packed weight,
    32 rows a call at most, so a row's result is the same bits alone or among 80 rows;
    elsewhere no packed copy (the engine refuses bf16 on such a CPU)."""
    bf16, _ = load_model(tiny_llama, torch.bfloat16, torch.device("cpu"))
    if not cpu_bf16_gemm_available():
        assert getattr(bf16.lm_head, "cpu_blocked_weight", None) is None
        return
    torch.manual_seed(0)
    for m in (bf16.lm_head, bf16.model.layers[0].mlp.gate_up_proj, bf16.model.layers[0].mlp.down_proj):
        x = torch.randn(80, m.in_features).bfloat16()
        full = linear(m, x)
        torch.testing.assert_close(full.float(), torch.nn.functional.linear(x.float(), m.weight.float()),
                                   rtol=2e-2, atol=2e-2)
        for j in (0, 5, 31, 32, 33, 79):
            assert torch.equal(full[j], linear(m, x[j:j + 1])[0])
