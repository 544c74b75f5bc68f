"""CUDA checks (run on the device machine: pytest -m gpu)."""

import pytest
import torch

from engine.attention.base import SeqAttn, StepAttnInputs
from engine.attention.torch_ref import TorchAttentionBackend
from engine.kv_cache import PagedKVCache
from engine.sampling import SamplingParams
from spec_decode.tree import MedusaTree
from tests.conftest import PROMPTS

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("page", [64, 256])
def test_xformers_attention_matches_torch_reference(page):
    from engine.attention.xformers_backend import XformersAttentionBackend

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    h, g, d = 9, 3, 64
    tree = MedusaTree.build("mc_sim_7b_63", 4)
    n_blocks = 64
    perm = torch.randperm(n_blocks).tolist()
    # (q_len, ctx_len, tree?) — prefill from scratch, a chunk after a prefix, plain decodes, trees.
    shapes = [(37, 0, False), (20, 100, False), (1, 300, False), (tree.num_nodes, 150, True),
              (tree.num_nodes, 5, True), (1, 70, False)]
    seqs, slots, used = [], [], 0
    for q_len, ctx, is_tree in shapes:
        total = ctx + (1 if is_tree else q_len) + tree.depth
        nb = -(-total // page)
        table = perm[used:used + nb]
        used += nb
        seqs.append(SeqAttn(q_len, ctx, table, tree.mask if is_tree else None))
        new = 1 if is_tree else q_len
        slots += [table[p // page] * page + p % page for p in range(ctx, ctx + new)]
        slots += [-1] * (q_len - new)
    assert used <= n_blocks
    t = sum(q for q, _, _ in shapes)
    q = torch.randn(t, h, d, device=dev, dtype=dtype)
    k = torch.randn(t, g, d, device=dev, dtype=dtype)
    v = torch.randn(t, g, d, device=dev, dtype=dtype)
    outs = []
    for cls in (TorchAttentionBackend, XformersAttentionBackend):
        cache = PagedKVCache(1, n_blocks, page, g, d, dtype, dev)
        torch.manual_seed(1)
        cache.k[0].copy_(torch.randn_like(cache.k[0]))
        cache.v[0].copy_(torch.randn_like(cache.v[0]))
        backend = cls(cache, dev)
        inputs = StepAttnInputs(seqs=seqs, slot_mapping=torch.tensor(slots), keep_kv=True)
        outs.append(backend.forward(0, q, k, v, backend.prepare(inputs)).float())
    ref, got = outs
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"page {page}: relative error xformers vs torch reference = {rel:.2e}")
    assert rel < 1e-2


@needs_cuda
def test_xformers_engine_tokens_match_reference_path():
    """Plain and Medusa (random heads, mc_sim_7b_63) on both attention paths, float32 on the GPU
    so that kernel rounding cannot flip a near-tie: every path gives the same greedy tokens."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=48)
    results = {}
    for backend in ("torch", "xformers"):
        for spec in (None, {"heads": "random", "tree": "mc_sim_7b_63"}):
            eng = Engine("default", attention_backend=backend, speculative=spec, dtype="float32")
            results[(backend, spec is not None)] = [o.token_ids for o in eng.generate_batch(PROMPTS, params)]
    ref = results[("torch", False)]
    for key, toks in results.items():
        same = sum(a == b for a, b in zip(toks, ref))
        print(f"{key}: {same}/{len(ref)} prompts identical to the torch plain path")
    for key, toks in results.items():
        assert toks == ref, key


@needs_cuda
def test_bf16_medusa_agreement_report():
    """bf16: how often Medusa's tree path reproduces plain decoding exactly (printed, and at
    least most prompts must agree: divergence can only come from rounding at near-ties)."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=96)
    plain = [o.token_ids for o in Engine("default").generate_batch(PROMPTS, params)]
    spec = Engine("default", speculative={"heads": "random", "tree": "mc_sim_7b_63"})
    med = [o.token_ids for o in spec.generate_batch(PROMPTS, params)]
    same = sum(a == b for a, b in zip(plain, med))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(plain, med)]
    print(f"bf16: {same}/{len(plain)} prompts identical; first divergence at tokens {prefix}")
    assert same >= len(plain) // 2
