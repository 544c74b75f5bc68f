"""The opt-in bf16 mode on a CPU (``dtype="bfloat16"``): oneDNN's packed bf16 GEMMs (rows of at
most 32 per call) and the attention token by token give a row the same bits whatever the batch
and the tree around it, so greedy Medusa equals greedy plain decoding token for token in that
mode, alone and batched; a CPU without oneDNN's bf16 kernel refuses the mode, naming ``dtype``."""

import pytest
import torch

from engine import SamplingParams
from engine.engine import Engine
from engine.models.llama import cpu_bf16_gemm_available
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_float16_is_refused_on_a_cpu(tiny_llama):
    with pytest.raises(ValueError, match="dtype: float16"):
        Engine(str(tiny_llama), dtype="float16", device="cpu")


def test_bf16_mode_medusa_equals_plain_decoding(bundled_dir):
    if not cpu_bf16_gemm_available():  # the mode's precondition, checked where it does not hold
        with pytest.raises(ValueError, match="dtype: bfloat16"):
            Engine(str(bundled_dir), dtype="bfloat16", device="cpu")
        return
    prompts = PROMPTS[:6]
    plain = Engine("default", dtype="bfloat16", device="cpu", max_num_seqs=8)
    assert plain.model.lm_head.cpu_blocked_weight.dtype == torch.bfloat16
    ref = [plain.generate_batch([p], GREEDY)[0].token_ids for p in prompts]
    assert [o.token_ids for o in plain.generate_batch(prompts, GREEDY)] == ref  # batched == alone
    for tree in ("mc_sim_7b_63", [[0], [1], [0, 0]]):
        eng = Engine("default", dtype="bfloat16", device="cpu", max_num_seqs=8,
                     speculative={"heads": "default", "tree": tree})
        assert [eng.generate_batch([p], GREEDY)[0].token_ids for p in prompts[:3]] == ref[:3]
        assert [o.token_ids for o in eng.generate_batch(prompts, GREEDY)] == ref
        assert eng.stats.mean_accepted_length > 1.2  # trees were verified and accepted
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
