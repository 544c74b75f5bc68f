"""Sampling controls on a tiny model: min_tokens, logprobs, top-k/top-p, per-position keys."""

import pytest
import torch

from engine import SamplingParams
from engine.engine import Engine
from engine.sample.sampler import processed_probs


def test_processed_probs_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-3))
    assert (p[0, :2] > 0).all() and (p[0, 2:] == 0).all()  # smallest prefix reaching top_p
    greedy = processed_probs(logits, SamplingParams(temperature=0))
    assert greedy[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_min_tokens_logprobs_and_top_k1(tiny_llama):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=256)
    prompt = [5, 9, 11]
    # Make EOS the greedy choice at the first step by using it as a stop id: find the greedy token.
    first = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].token_ids[0]
    out = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=6, min_tokens=4,
                                                      stop_token_ids=[first], logprobs=True))[0]
    assert len(out.token_ids) >= 4 and first not in out.token_ids[:4]
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    # top_k=1 sampling is greedy, whatever the temperature and seed.
    greedy = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    topk1 = eng.generate_batch([prompt], SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=12,
                                                        ignore_eos=True))[0]
    assert topk1.token_ids == greedy.token_ids
    assert out.metrics.num_steps >= 4 and out.metrics.finish_time >= out.metrics.first_token_time


def test_min_tokens_with_medusa_equals_plain(tiny_llama):
    prompt = [5, 9, 11]
    plain = Engine(str(tiny_llama), block_size=4, num_blocks=256)
    spec = Engine(str(tiny_llama), block_size=4, num_blocks=256,
                  speculative={"heads": "random", "tree": "small_12", "num_heads": 4})
    toks = plain.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    # Stop ids that greedy decoding would hit early, held off by min_tokens on both engines.
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=toks[:3])
    a = plain.generate_batch([prompt], params)[0]
    b = spec.generate_batch([prompt], params)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 6


def test_top_logprobs_equal_with_and_without_medusa(tiny_llama):
    """Every produced token's logprob and its top alternatives come from the (tree node's)
    distribution it was decided from: the same with Medusa as in plain decoding."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3)
    prompts = [[5, 9, 11], [7, 7, 7, 7]]
    plain = Engine(str(tiny_llama), block_size=4, num_blocks=256).generate_batch(prompts, params)
    spec = Engine(str(tiny_llama), block_size=4, num_blocks=256,
                  speculative={"heads": "random", "num_heads": 2, "tree": "chain:2"}).generate_batch(prompts, params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and len(a.top_logprobs) == len(a.token_ids)
        for tok, lp, alts, alts_b in zip(a.token_ids, a.logprobs, a.top_logprobs, b.top_logprobs):
            assert [t for t, _ in alts] == [t for t, _ in alts_b] and alts[0][0] == tok
            assert alts[0][1] == pytest.approx(lp, abs=1e-5)
            assert [v for _, v in alts] == pytest.approx([v for _, v in alts_b], abs=1e-4)
