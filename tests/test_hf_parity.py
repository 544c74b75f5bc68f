"""Greedy output of the engine == HF transformers greedy generate, token for token."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from engine.engine import Engine
from tests.conftest import PROMPTS, hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=False)


def _truncate_at_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """Up to and including the first token of the EOS set."""
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if cut is None else tokens[: cut + 1]


@pytest.fixture(scope="module")
def bundled_engine(bundled_dir):
    return Engine(str(bundled_dir), max_num_seqs=16)


def test_bundled_batch1_matches_hf(bundled_engine, hf_bundled):
    # (Five prompts at 64 tokens; the mixed batch below checks every prompt against HF too.)
    for prompt in PROMPTS[:5]:
        ids = bundled_engine.encode(prompt)
        [out] = bundled_engine.generate_batch([ids], GREEDY)
        ref = _truncate_at_eos(hf_greedy(hf_bundled, ids, 64), bundled_engine.eos_token_ids)
        assert out.token_ids == ref, prompt


def test_bundled_mixed_batch_matches_hf(bundled_engine, hf_bundled):
    prompts = [bundled_engine.encode(p) for p in PROMPTS]
    # Mixed lengths and budgets in one batch.
    params = [SamplingParams(temperature=0, max_tokens=16 + 8 * (i % 4)) for i in range(len(prompts))]
    outs = bundled_engine.generate_batch(prompts, params)
    for ids, p, out in zip(prompts, params, outs):
        ref = _truncate_at_eos(hf_greedy(hf_bundled, ids, p.max_tokens), bundled_engine.eos_token_ids)
        assert out.token_ids == ref


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_tied"])
def test_tiny_configs_match_hf(fixture, request):
    path = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eng = Engine(str(path), block_size=4, num_blocks=256)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (1, 5, 17, 40)]
    # ignore_eos: random weights emit EOS at random; HF generate is told the same below.
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = eng.generate_batch(prompts, sp)
    for ids, out in zip(prompts, outs):
        t = torch.tensor([ids])
        ref = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=48, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
