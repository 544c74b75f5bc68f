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
def test_medusa_lossless_on_gpu_float32_reference_path():
    """float32 on the GPU (torch reference attention; xformers' kernels take only 16-bit):
    Medusa with random heads gives exactly plain greedy's tokens."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=48)
    plain = Engine("default", attention_backend="torch", dtype="float32").generate_batch(PROMPTS, params)
    spec = Engine("default", attention_backend="torch", dtype="float32",
                  speculative={"heads": "random", "tree": "mc_sim_7b_63"}).generate_batch(PROMPTS, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_agreement_report(dtype):
    """16-bit: how often each path reproduces the torch-reference plain tokens exactly (printed).
    Divergence can only come from rounding at near-ties; most prompts must agree."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=96)
    runs = {}
    for backend in ("torch", "xformers"):
        for spec in (None, {"heads": "random", "tree": "mc_sim_7b_63"}):
            eng = Engine("default", attention_backend=backend, speculative=spec, dtype=dtype)
            runs[(backend, spec is not None)] = [o.token_ids for o in eng.generate_batch(PROMPTS, params)]
    ref = runs[("torch", False)]
    for key, toks in runs.items():
        same = sum(a == b for a, b in zip(toks, ref))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(toks, ref)]
        print(f"{dtype} {key}: {same}/{len(ref)} prompts identical; first divergence {first}")
        assert same >= len(ref) // 2
