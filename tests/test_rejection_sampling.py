"""Lossless rejection sampling: tokens sampled with speculation follow the model's own
distribution (chi-square goodness of fit against exact probabilities, fixed seeds)."""

import math

import torch
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from engine.engine import Engine
from tests.tiny import make_tiny_model

VOCAB = 12
PROMPT = [4, 7, 5]
N = 3000


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_joint(path, temp: float = 1.0) -> torch.Tensor:
    """The model's exact joint distribution of its first two tokens after PROMPT (HF, fp32)."""
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([PROMPT])).logits[0, -1] / temp, -1)
        p2 = torch.softmax(hf(torch.tensor([PROMPT + [t] for t in range(VOCAB)])).logits[:, -1] / temp, -1)
    return (p1[:, None] * p2).flatten()


def _assert_fits(outs, exact: torch.Tensor) -> None:
    """The outputs' first two tokens fit ``exact`` (chi-square, cells expecting fewer than 5 pooled)."""
    counts = torch.zeros(VOCAB * VOCAB)
    for o in outs:
        counts[o.token_ids[0] * VOCAB + o.token_ids[1]] += 1
    expected = exact * len(outs)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-9)).sum())
    df = int(big.sum())
    assert chi2 < _chi2_critical(df), (chi2, df)


def test_rejection_sampling_matches_model_distribution(tmp_path):
    path = make_tiny_model(tmp_path / "m", vocab_size=VOCAB, hidden_size=32, num_heads=2, num_kv_heads=1, seed=7)
    temp = 1.0
    exact = _exact_joint(path, temp)

    spec = {"heads": "random", "num_heads": 2, "tree": [[0], [1], [2], [0, 0], [1, 0]], "acceptance": "rejection"}
    eng = Engine(str(path), speculative=spec, block_size=4, num_blocks=4096, max_num_seqs=256,
                 max_num_batched_tokens=4096)
    params = [SamplingParams(temperature=temp, seed=s, max_tokens=3, ignore_eos=True) for s in range(N)]
    outs = eng.generate_batch([PROMPT] * N, params)
    # Speculation must have happened for the test to mean anything.
    assert eng.stats.num_decode_steps > 0 and sum(eng.stats.accepted_hist[1:]) > N // 10
    _assert_fits(outs, exact)


def test_rejection_sampling_over_adaptive_trees_matches_model_distribution(tmp_path):
    """The same goodness of fit when every sequence verifies its own tree (adaptive trees): the
    first decode step's tokens, decided by the rejection rule over ragged trees on the host
    path, still follow the model's own distribution."""
    from engine.core.backoff import LatencyModel, LatencyPoint

    path = make_tiny_model(tmp_path / "m", vocab_size=VOCAB, hidden_size=32, num_heads=2, num_kv_heads=1, seed=7)
    exact = _exact_joint(path)

    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    spec = {"heads": "random", "num_heads": 3, "tree": tree, "acceptance": "rejection", "adaptive": True}
    eng = Engine(str(path), speculative=spec, block_size=4, num_blocks=4096, max_num_seqs=256,
                 max_num_batched_tokens=4096)
    # A device on which trees are cheap, so that the plan verifies nodes whatever this CPU measured.
    eng.policy.adaptive.latency = LatencyModel([LatencyPoint(b, n, 10.0 + 0.001 * b * (n + 1))
                                                for n in (0, 1, 2, 4, 7) for b in (1, 4, 16, 64, 256)])
    eng.policy.adaptive.learning_rate = 0.0
    trees_per_step = []
    schedule = eng.scheduler.schedule

    def spy():
        out = schedule()
        trees_per_step.append({len(s.candidates) for s in out.seqs if s.sample and len(s.token_ids) == 1})
        return out

    eng.scheduler.schedule = spy
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True) for s in range(N)]
    outs = eng.generate_batch([PROMPT] * N, params)
    assert any(len(sizes) > 1 for sizes in trees_per_step), trees_per_step  # ragged steps ran
    assert sum(eng.stats.accepted_hist[1:]) > N // 10  # and accepted candidates
    _assert_fits(outs, exact)
