"""CUDA checks (run on the device machine: pytest -m gpu)."""

import pytest
import torch

from engine import SamplingParams
from engine.attention.base import SeqAttn, StepAttnInputs
from engine.attention.kv_cache import PagedKVCache
from engine.attention.torch_ref import TorchAttentionBackend
from engine.spec.tree import MedusaTree
from engine.worker.cuda_graphs import load_inputs
from tests.conftest import PROMPTS

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("page,ragged", [(64, False), (256, False), (64, True)])
def test_triton_attention_matches_torch_reference(page, ragged):
    """Prefill chunks, plain decodes and trees in one step; ``ragged``: the trees are adaptive
    ones, each sequence its own (the tree kernel's ragged mode)."""
    from engine.attention.triton_backend import TritonAttentionBackend

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    h, g, d = 9, 3, 64
    full = MedusaTree.build("mc_sim_7b_63", 4)
    # (Node order is by depth: the first k candidates are closed under parents.)
    trees = [full, MedusaTree(full.choices[:9]) if ragged else full, MedusaTree(full.choices[:2]) if ragged else full]
    n_blocks = 64
    perm = torch.randperm(n_blocks).tolist()
    # (q_len, ctx_len, tree) — prefill from scratch, a chunk after a prefix, plain decodes, trees.
    shapes = [(37, 0, None), (20, 100, None), (1, 300, None), (trees[0].num_nodes, 150, trees[0]),
              (trees[1].num_nodes, 5, trees[1]), (1, 70, None), (trees[2].num_nodes, 90, trees[2])]
    seqs, slots, used = [], [], 0
    scratch0 = (n_blocks + 1) * page  # PagedKVCache's scratch region: tree nodes are written there
    for q_len, ctx, tree in shapes:
        is_tree = tree is not None
        total = ctx + (1 if is_tree else q_len) + full.depth
        nb = -(-total // page)
        table = perm[used:used + nb]
        used += nb
        seqs.append(SeqAttn(q_len, ctx, table, tree.mask if is_tree else None))
        new = 1 if is_tree else q_len
        slots += [table[p // page] * page + p % page for p in range(ctx, ctx + new)]
        slots += [scratch0 + len(slots) + i for i in range(q_len - new)]
    assert used <= n_blocks
    t = sum(q for q, _, _ in shapes)
    q = torch.randn(t, h, d, device=dev, dtype=dtype)
    k = torch.randn(t, g, d, device=dev, dtype=dtype)
    v = torch.randn(t, g, d, device=dev, dtype=dtype)
    outs = []
    for cls in (TorchAttentionBackend, TritonAttentionBackend):
        cache = PagedKVCache(1, n_blocks, page, g, d, dtype, dev, scratch_tokens=sum(q for q, _, _ in shapes))
        torch.manual_seed(1)
        cache.k[0].copy_(torch.randn_like(cache.k[0]))
        cache.v[0].copy_(torch.randn_like(cache.v[0]))
        backend = cls(cache, dev)
        inputs = StepAttnInputs(seqs=seqs, slot_mapping=torch.tensor(slots))
        outs.append(backend.forward(0, q, k, v, backend.prepare(inputs)).float())
    ref, got = outs
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"page {page}, ragged {ragged}: relative error triton vs torch reference = {rel:.2e}")
    assert rel < 1e-2


@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,page,tree_name,lens", [
    (9, 3, 64, 64, "mc_sim_7b_63", [0, 1, 63, 64, 700]),  # the bundled model's shape
    (32, 8, 128, 256, "mc_sim_7b_63", [5, 1500]),  # Llama-3.1-8B's
    (32, 8, 128, 64, "chain:2", [130, 2, 4000]),
])
def test_tree_kernel_matches_torch_reference(heads, kv_heads, head_dim, page, tree_name, lens):
    """The fused verify-step attention (engine/kernels/tree_attention.py) on bf16 against the
    float32 torch reference, as close as the bf16 torch reference gets: prefixes of 0 to several pages (one not a multiple of the tile),
    grouped-query heads, a 64-node tree and a 2-candidate chain, shuffled block tables — in one
    run over each prefix, in split-K runs (3, and more runs than a short prefix has tiles) and
    with the splits the kernel picks for the grid."""
    from engine.kernels.tree_attention import paged_tree_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    tree = MedusaTree.build(tree_name, 4)
    n, b = tree.num_nodes, len(lens)
    tables = []
    n_blocks = sum(-(-(length + n) // page) for length in lens) + 3
    perm = torch.randperm(n_blocks).tolist()
    for length in lens:
        nb = -(-(length + n) // page)
        tables.append(perm[:nb])
        perm = perm[nb:]
    width = max(len(t) for t in tables)
    table_t = torch.zeros(b, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table_t[i, :len(t)] = torch.tensor(t)
    q = torch.randn(b * n, heads, head_dim, device=dev)
    k = torch.randn(b * n, kv_heads, head_dim, device=dev)
    v = torch.randn(b * n, kv_heads, head_dim, device=dev)
    outs = []
    for dtype, kernel in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        splits_runs = []
        cache = PagedKVCache(1, n_blocks, page, kv_heads, head_dim, dtype, dev, scratch_tokens=b * n)
        torch.manual_seed(1)
        cache.k[0].copy_(torch.randn_like(cache.k[0], dtype=torch.float32))
        cache.v[0].copy_(torch.randn_like(cache.v[0], dtype=torch.float32))
        flat = []  # each root's slot in its blocks, its candidates' in the scratch region
        for i, (length, t) in enumerate(zip(lens, tables)):
            flat.append(t[length // page] * page + length % page)
            flat += range(cache.scratch_slot0 + i * n + 1, cache.scratch_slot0 + (i + 1) * n)
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        if not kernel:
            ref = TorchAttentionBackend(cache, dev)
            meta = ref.prepare(StepAttnInputs([SeqAttn(n, length, t, tree.mask) for length, t in zip(lens, tables)],
                                              torch.tensor(flat)))
            outs.append(ref.forward(0, qd, kd, vd, meta).float())
        else:
            cache.write(0, torch.tensor(flat, device=dev), kd, vd)
            for splits in (1, 3, 40, None):
                splits_runs.append(paged_tree_attention(qd, kd, vd, cache.k[0], cache.v[0], table_t.to(dev),
                                                        torch.tensor(lens, dtype=torch.int32, device=dev),
                                                        tree.mask.to(dev, torch.int8), page, splits=splits).float())
            outs.append(splits_runs)
    ref, ref16, runs = outs
    rel16 = ((ref16 - ref).norm() / ref.norm()).item()
    for splits, got in zip((1, 3, 40, None), runs):
        rel = ((got - ref).norm() / ref.norm()).item()
        agree = ((got - ref16).norm() / ref16.norm()).item()
        print(f"{tree_name} over {lens} (page {page}, {heads}/{kv_heads} heads, d {head_dim}, splits {splits}): "
              f"relative error vs float32 {rel:.2e} (the bf16 torch reference's {rel16:.2e}); kernel vs bf16 "
              f"reference {agree:.2e}")
        assert rel < 1.5 * rel16 + 1e-4, splits  # as accurate as the reference in bf16


@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(9, 3, 64, 64), (32, 8, 128, 256), (8, 8, 64, 64)])
def test_varlen_kernel_matches_torch_reference(heads, kv_heads, head_dim, page):
    """The mixed-step attention (engine/kernels/varlen_attention.py) on bf16 against the float32
    torch reference, as close as the bf16 reference gets: a prompt's first chunk, later chunks
    after cached prefixes (one of several pages), decode tokens, a padding sequence with no
    tokens and padding rows past the step's tokens (left as they were), shuffled tables."""
    from engine.kernels.varlen_attention import paged_varlen_attention
    from engine.kernels.varlen_tiles import tile_starts

    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(37, 0), (20, 100), (1, 300), (0, 0), (130, 700), (1, 5), (16, 16), (3, 1)]  # (q_len, cached)
    n_blocks = sum(-(-(c + q) // page) + 1 for q, c in shapes) + 2
    perm = torch.randperm(n_blocks).tolist()
    tables, slots = [], []
    for q_len, ctx in shapes:
        nb = -(-(ctx + q_len) // page) + 1
        tables.append(perm[:nb])
        perm = perm[nb:]
        slots += [tables[-1][p // page] * page + p % page for p in range(ctx, ctx + q_len)]
    t, pad_rows = sum(q for q, _ in shapes), 11
    q = torch.randn(t + pad_rows, heads, head_dim, device=dev)
    k = torch.randn(t, kv_heads, head_dim, device=dev)
    v = torch.randn(t, kv_heads, head_dim, device=dev)
    width = max(len(tb) for tb in tables)
    table_t = torch.zeros(len(shapes), width, dtype=torch.int32)
    for i, tb in enumerate(tables):
        table_t[i, :len(tb)] = torch.tensor(tb)
    q_lens = [n for n, _ in shapes]
    ints = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    outs = []
    for dtype, kernel in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        cache = PagedKVCache(1, n_blocks, page, kv_heads, head_dim, dtype, dev)
        torch.manual_seed(1)
        cache.k[0].copy_(torch.randn_like(cache.k[0], dtype=torch.float32))
        cache.v[0].copy_(torch.randn_like(cache.v[0], dtype=torch.float32))
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        if not kernel:
            ref = TorchAttentionBackend(cache, dev)
            meta = ref.prepare(StepAttnInputs([SeqAttn(n, c, tb) for (n, c), tb in zip(shapes, tables) if n],
                                              torch.tensor(slots)))
            outs.append(ref.forward(0, qd[:t], kd, vd, meta).float())
        else:
            cache.write(0, torch.tensor(slots, device=dev), kd, vd)
            out = torch.full_like(qd, 7.0)
            paged_varlen_attention(qd, cache.k[0], cache.v[0], table_t.to(dev), ints([0] + [sum(q_lens[:i + 1])
                                                                                          for i in range(len(shapes))]),
                                   ints([n + c for n, c in shapes]), ints(tile_starts(q_lens)), page, out=out)
            assert (out[t:] == 7.0).all()  # padding rows untouched
            outs.append(out[:t].float())
    ref, ref16, got = outs
    rel, rel16 = ((got - ref).norm() / ref.norm()).item(), ((ref16 - ref).norm() / ref.norm()).item()
    print(f"varlen kernel ({heads}/{kv_heads} heads, d {head_dim}, page {page}): relative error vs float32 "
          f"{rel:.2e} (the bf16 torch reference's {rel16:.2e})")
    assert rel < 1.5 * rel16 + 1e-4


@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 2, 80)])
def test_fused_kv_write_equals_index_copy(heads, kv_heads, head_dim):
    """The cache write the model uses on CUDA (one Triton launch for K and V, reading them as
    views of the fused QKV projection) writes what two index_copy_ of dense copies write; the
    commit's copy (one launch for every layer's K and V) what the indexed copies write."""
    from engine.kernels.kv_write import copy_slots, write_kv

    torch.manual_seed(head_dim)
    t, slots_total = 300, 1024
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(t, kv_heads, head_dim)
    slots = torch.randperm(slots_total, device="cuda")[:t]
    caches = [torch.zeros(slots_total, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    write_kv(caches[0], caches[1], slots, k, v)
    caches[2].index_copy_(0, slots, k.contiguous())
    caches[3].index_copy_(0, slots, v.contiguous())
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])

    # A commit: every layer's rows at src (the scratch region) to dst, several rejected rows
    # to one pad slot (nothing reads it), as the indexed copies give.
    k_all, v_all = (torch.randn(5, slots_total, kv_heads, head_dim, device="cuda").to(torch.bfloat16) for _ in range(2))
    src = torch.arange(900, 940, device="cuda")
    dst = torch.cat([torch.randperm(800, device="cuda")[:30], torch.full((10,), 850, device="cuda")])
    want_k, want_v = k_all.clone(), v_all.clone()
    want_k[:, dst], want_v[:, dst] = want_k[:, src], want_v[:, src]
    copy_slots(k_all, v_all, src, dst)
    keep = torch.ones(slots_total, dtype=torch.bool, device="cuda")
    keep[850] = False
    assert torch.equal(k_all[:, keep], want_k[:, keep]) and torch.equal(v_all[:, keep], want_v[:, keep])
    # The pad slot: racing writes may mix rows (so may the indexed copy), but every value there
    # is one that some row sent there holds at that place.
    for cache in (k_all, v_all):
        assert (cache[:, 850][:, None] == cache[:, src[30:]]).any(1).all()


@needs_cuda
@pytest.mark.parametrize("rows,cols,k", [(1, 8192, 10), (23, 8192, 10), (640, 8192, 10), (7, 1000, 4),
                                         (3, 16384, 16), (4, 32768, 10), (2, 20000, 10)])
def test_triton_topk_takes_torch_topk_values(rows, cols, k):
    """row_topk's Triton program: the same k values as torch.topk, largest first, k distinct
    columns per row (ties included), mapped through a vocabulary when given one; with
    probabilities, each winner's softmax over its row as torch computes it in float32."""
    from engine.spec.topk import row_topk, row_topk_probs

    torch.manual_seed(rows)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    x[0, 3] = x[0, 11] = x[0].max() + 1  # a tie at the top: both ids, lower first
    got = row_topk(x, k)
    assert torch.equal(x.gather(1, got), torch.topk(x, k, dim=-1).values)
    assert got[0, :2].tolist() == [3, 11]
    assert all(len(set(r)) == k for r in got.tolist())
    ids = torch.randperm(cols, device="cuda")
    assert torch.equal(row_topk(x.view(1, rows, cols), k, ids).view(rows, k), ids[got])
    # With each winner's softmax probability over its row (the adaptive policy's confidences).
    mapped, probs = row_topk_probs(x.view(1, rows, cols), k, ids)
    assert torch.equal(mapped.view(rows, k), ids[got]) and probs.shape == (1, rows, k)
    want = torch.softmax(x.float(), dim=-1).gather(1, got)
    assert torch.allclose(probs.view(rows, k), want, rtol=1e-4, atol=1e-7), (probs.view(rows, k) - want).abs().max()


@needs_cuda
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim,inter", [(9, 3, 64, 1536), (32, 8, 128, 14336), (5, 1, 16, 100)])
def test_triton_rope_and_silu_mul_equal_the_float32_math(rows, heads, kv_heads, head_dim, inter):
    """rope_silu's RoPE and SiLU·mul: in float32 the eager functions' values (to float32
    rounding); in bf16 those values rounded once (within one bf16 step of them), q and k views
    of one tensor, v the projection's own columns."""
    from engine.kernels import rope_silu
    from engine.models import ops

    torch.manual_seed(rows)
    width = (heads + 2 * kv_heads) * head_dim
    pos = torch.randint(0, 8000, (rows,), device="cuda").float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        # A strided projection (rows of a wider buffer), as a sliced GEMM output can be.
        qkv = torch.randn(rows, width + 8, device="cuda").to(dtype)[:, :width]
        cos, sin = emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)
        q, k, v = rope_silu.qkv_rope(qkv, cos, sin, heads, kv_heads, head_dim)
        rq, rk, rv = ops.qkv_rope(qkv.float(), cos.float(), sin.float(), heads, kv_heads, head_dim)
        gate_up = torch.randn(rows, 2 * inter, device="cuda").to(dtype)
        got, want = rope_silu.silu_mul(gate_up), ops.silu_mul(gate_up.float())
        assert q.dtype == k.dtype == got.dtype == dtype and q.shape == rq.shape and k.shape == rk.shape
        assert v.data_ptr() == qkv[:, (heads + kv_heads) * head_dim:].data_ptr() and torch.equal(v.float(), rv)
        assert q.data_ptr() + heads * head_dim * q.element_size() == k.data_ptr()
        for a, b in ((q, rq), (k, rk), (got, want)):
            # float32: a few units of float32 rounding; bf16: one rounding of the float32 value.
            tol = 1e-5 if dtype == torch.float32 else 2 ** -8
            assert torch.allclose(a.float(), b, rtol=tol, atol=tol), (a.float() - b).abs().max()


@needs_cuda
@pytest.mark.parametrize("rows", [1, 10, 100])
def test_proposal_kernels_equal_the_torch_ops(rows):
    """The fused proposal's programs (engine/kernels/proposal.py) against the torch ops
    they replace, in float32 (no TF32 on either side): a ResBlock for several heads, also
    reading one row set broadcast to every head; a sequential head's input from the path's
    embeddings; the top-k written into the tree's node columns — the same ids torch.topk and
    an index give (exactly: random float32 logits do not tie), and with probabilities, the
    softmax's values beside them."""
    from engine.kernels.proposal import path_input, resblock
    from engine.spec.topk import topk_into

    torch.manual_seed(rows)
    dev, h, heads, vocab = torch.device("cuda"), 96, 4, 500
    x = torch.randn(heads, rows, h, device=dev)
    w, b = torch.randn(heads, h, h, device=dev) / h ** 0.5, torch.randn(heads, 1, h, device=dev)
    for xs in (x, x[:1].expand(heads, -1, -1)):
        want = xs + torch.nn.functional.silu(torch.baddbmm(b, xs, w))
        assert torch.allclose(resblock(xs, w, b), want, atol=1e-5, rtol=1e-5)

    table = torch.randn(vocab, h, device=dev)
    tokens = torch.randint(0, vocab, (rows, 7), device=dev)
    anc = torch.tensor([[0, 1, 3], [0, 2, 4], [0, 1, 5]], device=dev)  # 3 parents' paths, root first
    pw, hidden = torch.randn(3 * h, h, device=dev) / h, torch.randn(rows, h, device=dev)
    want = (hidden[:, None] + table[tokens[:, anc]].flatten(2) @ pw).flatten(0, 1)
    assert torch.allclose(path_input(tokens, anc, table, pw, hidden), want, atol=1e-5, rtol=1e-5)

    k = 5
    dest = torch.full((3, k), -1, dtype=torch.long, device=dev)
    dest[0, :3], dest[1, 1], dest[2, [0, 4]] = torch.tensor([1, 2, 3], device=dev), 4, torch.tensor([5, 6], device=dev)
    logits = torch.randn(rows * 3, 1000, device=dev)
    for mapped in (None, torch.randperm(1000, device=dev)):
        got = torch.full((rows, 7), -7, dtype=torch.long, device=dev)
        topk_into(logits, k, mapped, got, dest)
        top = logits.topk(k, dim=-1).indices.view(rows, 3, k)
        top = mapped[top] if mapped is not None else top
        want = torch.full((rows, 7), -7, dtype=torch.long, device=dev)
        want[:, 1:7] = top[:, [0, 0, 0, 1, 2, 2], [0, 1, 2, 1, 0, 4]]
        assert torch.equal(got, want)
        # The same winners with their softmax probabilities, into the same node columns.
        got2, probs = torch.full_like(got, -7), torch.full((rows, 7), -1.0, device=dev)
        topk_into(logits, k, mapped, got2, dest, probs)
        p = torch.softmax(logits, dim=-1).topk(k, dim=-1).values.view(rows, 3, k)
        want_p = torch.full((rows, 7), -1.0, device=dev)
        want_p[:, 1:7] = p[:, [0, 0, 0, 1, 2, 2], [0, 1, 2, 1, 0, 4]]
        assert torch.equal(got2, want) and torch.allclose(probs, want_p, rtol=1e-4, atol=1e-7)


def _greedy_decision_cases(dev, tree, b, seed):
    """Random verify steps of ``b`` sequences on ``tree`` whose candidates follow the argmax at
    their parent 3 times in 4 (accepted paths of every length), with a paged cache to commit to."""
    gen = torch.Generator().manual_seed(seed)
    n, page, vocab = tree.num_nodes, 16, 7
    argmax = torch.randint(0, vocab, (b, n), generator=gen)
    tokens = torch.randint(0, vocab, (b, n), generator=gen)
    follows = torch.rand((b, n), generator=gen) < 0.75
    parents = torch.tensor([0] + tree.parents[1:])
    tokens = torch.where(follows, argmax[:, parents], tokens)
    start = torch.randint(0, 70, (b, 1), generator=gen)
    # Each sequence its own blocks, as the block manager hands them out (positions < 80).
    tables = torch.randperm(5 * b, generator=gen).view(b, 5)
    cache = PagedKVCache(2, 5 * b, page, 2, 8, torch.float32, dev, scratch_tokens=b * n)
    cache.k_all.copy_(torch.randn(cache.k_all.shape, generator=gen))
    cache.v_all.copy_(torch.randn(cache.v_all.shape, generator=gen))
    return [x.to(dev) for x in (tokens, argmax, start, tables)], cache


def _ragged_case(tokens, argmax, vocab, gen):
    """A ragged step over the same sequences (adaptive trees): sequence s verifies the full
    tree's first k_s nodes (closed under parents: nodes are ordered by depth; k_s = 0 a
    padding sequence, 1 its pending token alone), tokens flat, then a few padding tokens.
    Returns (hidden: one-hot argmax rows, ids, nodes, seqs, q_starts)."""
    b, n = tokens.shape
    counts = torch.randint(0, n + 1, (b,), generator=gen).tolist()
    counts[0] = n  # one whole tree
    ids, nodes, seqs, rows = [], [], [], []
    for s, k in enumerate(counts):
        ids += tokens[s, :k].tolist()
        rows += argmax[s, :k].tolist()
        nodes += range(k)
        seqs += [s] * k
    q_starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    pad = 3
    ids, nodes, seqs, rows = ids + [0] * pad, nodes + [0] * pad, seqs + [0] * pad, rows + [0] * pad
    dev = tokens.device
    hidden = torch.nn.functional.one_hot(torch.tensor(rows, device=dev), vocab).float()
    return hidden, *(torch.tensor(x, device=dev) for x in (ids, nodes, seqs, q_starts))


@needs_cuda
@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63", "small_12", "chain:4"])
def test_fused_decisions_equal_the_torch_ops(tree_name):
    """engine/kernels/decision.py through SpecTail: the greedy decision (uniform, and over a
    ragged step's adaptive trees), and the rows and commit of a decision the sampled rules
    made (any path, any count along it, any bonus),
    give the same accepted count, accepted tokens, bonus token and proposal row as the torch
    ops they replace, and the same K/V in every slot but the pad slot (rejected depths all land
    there, in no defined order: CUDA's indexed copy with repeated destinations)."""
    from engine.sample.tail import SpecTail

    dev = torch.device("cuda")
    tree = MedusaTree.build(tree_name, 4)
    depth, vocab = tree.depth, 7
    lengths = set()
    for b, seed in ((1, 0), (5, 1), (64, 2)):
        (tokens, argmax, start, tables), cache = _greedy_decision_cases(dev, tree, b, seed)
        # lm_head the identity on one-hot rows: the greedy tail's argmax is ``argmax``.
        tail = SpecTail(cache, lambda h: h, None)
        hidden = torch.nn.functional.one_hot(argmax.flatten(), vocab).float()
        paths = tail.device_tensor(tree, "paths")
        gen = torch.Generator().manual_seed(seed)
        path = paths[torch.randint(0, paths.shape[0], (b,), generator=gen).to(dev)]
        n_acc = ((torch.rand(b, generator=gen).to(dev) * ((path[:, 1:] >= 0).sum(1) + 1)).long())
        bonus = torch.randint(0, vocab, (b,), generator=gen).to(dev)
        ragged = _ragged_case(tokens, argmax, vocab, gen)
        decisions = {"greedy": lambda: tail.greedy(hidden, tree, tokens, start, tables),
                     "sampled": lambda: tail._finish(tree, tokens, start, tables, path, n_acc, bonus),
                     "ragged": lambda: tail.greedy_ragged(ragged[0], tree, *ragged[1:], start[:, 0], tables)}
        for name, decide in decisions.items():
            results = []
            for fused in (True, False):
                tail.fused = fused
                k0, v0 = cache.k_all.clone(), cache.v_all.clone()
                results.append((decide().tolist(), cache.k_all.clone(), cache.v_all.clone()))
                cache.k_all.copy_(k0)
                cache.v_all.copy_(v0)
            (got, k1, v1), (want, k2, v2) = results
            for g, w in zip(got, want):
                n = w[0]
                assert g[:1 + n] == w[:1 + n] and g[1 + depth:] == w[1 + depth:], (name, b, g, w)
            pad = cache.pad_slot
            for x, y in ((k1, k2), (v1, v2)):
                assert torch.equal(x[:, :pad], y[:, :pad]) and torch.equal(x[:, pad + 1:], y[:, pad + 1:]), (name, b)
            lengths |= {w[0] for w in want}
    assert len(lengths) >= 3, lengths  # short and long accepted paths were both checked


@needs_cuda
@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63", "small_12", "chain:4"])
def test_triton_typical_acceptance_equals_the_torch_rule(tree_name):
    """engine/kernels/typical_acceptance.py through SpecTail.sampled: typical acceptance from the logits
    (alone, and beside greedy rows and exact-match rows) gives the same rows — accepted count,
    tokens, bonus draw, proposal row — as the torch rule over processed probabilities, over
    bf16 logits of a 32k vocabulary whose candidates are often their parent's likely tokens
    (accepted paths of every length)."""
    from engine.sample.tail import SpecTail
    from engine.worker.device_tail import DeviceTail

    dev = torch.device("cuda")
    tree = MedusaTree.build(tree_name, 4)
    n, vocab, lengths, compared = tree.num_nodes, 32000, set(), 0
    parents = torch.tensor([0] + tree.parents[1:])
    for b, seed in ((1, 0), (7, 1), (48, 2)):
        (_, _, start, tables), cache = _greedy_decision_cases(dev, tree, b, seed)
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(b * n, vocab, generator=gen) * 2.5).to(dev, torch.bfloat16)
        likely = logits.view(b, n, vocab).float().topk(3, -1).indices.cpu()
        tokens = likely[torch.arange(b)[:, None], parents[None], torch.randint(0, 3, (b, n), generator=gen)]
        follows = torch.rand(b, n, generator=gen) < 0.3 + 0.7 * torch.rand(b, 1, generator=gen)
        tokens = torch.where(follows, tokens, torch.randint(0, vocab, (b, n), generator=gen)).to(dev)
        tail = SpecTail(cache, lambda h: h, None)
        for mixed in (False, True):
            temps = [0.5, 0.7, 1.0, 1.3]
            params = [SamplingParams(temperature=0 if mixed and i % 3 == 0 else temps[i % 4]) for i in range(b)]
            names = ["greedy" if p.greedy or (mixed and i % 3 == 1) else "typical" for i, p in enumerate(params)]
            static = DeviceTail.sampled_inputs(params, [77 + i for i in range(b)], names).to(dev)
            got = []
            for fused in (True, False):
                tail.fused = fused
                k0, v0 = cache.k_all.clone(), cache.v_all.clone()
                got.append(tail.sampled(logits, tree, tokens, start, tables, static, frozenset(names), False,
                                        mixed).tolist())
                cache.k_all.copy_(k0)
                cache.v_all.copy_(v0)
            assert got[0] == got[1], (mixed, b)
            lengths |= {r[0] for r, name in zip(got[1], names) if name == "typical"}
            compared += names.count("typical")
    assert compared >= 70 and len(lengths) >= 3, (compared, lengths)


@needs_cuda
def test_cuda_draws_are_the_keyed_hash_and_the_inverse_cdf():
    """engine/kernels/keyed_sampling.py: keyed_uniform on CUDA gives the CPU hash's numbers bit for bit
    (broadcast shapes, ints, every draw); sample_rows on CUDA gives each row's exact inverse
    CDF at u (float64 sums over the float32 probabilities), never a zero-mass token, the hot
    token of a one-hot row."""
    from engine.sample.sampler import RESIDUAL_DRAW, keyed_uniform, sample_rows, seed_key

    gen = torch.Generator().manual_seed(0)
    keys = torch.tensor([seed_key(s) for s in (0, 1, -5, 2 ** 63, 123456789)])
    pos = torch.randint(0, 2 ** 31, (5, 9), generator=gen)
    for args in ((keys[:, None], pos, 0), (keys, 17, 3), (keys[:, None], pos[:, :1], torch.arange(10)[None]),
                 (keys[0], 5, RESIDUAL_DRAW), (keys, pos[:, 0], RESIDUAL_DRAW)):
        on_cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.equal(keyed_uniform(*on_cuda).cpu(), keyed_uniform(*args)), args
    probs = torch.softmax(torch.randn(64, 49152, generator=gen) * torch.rand(64, 1, generator=gen) * 6, -1)
    probs[1, ::2] = 0.0
    probs[2] = 0.0
    probs[2, 40000] = 1.0
    u = keyed_uniform(keys[:1], torch.arange(64), 0)
    got = sample_rows(probs.cuda(), u.cuda()).cpu()
    cdf = probs.double().cumsum(-1)
    target = u * cdf[:, -1]
    rows = torch.arange(64)
    assert bool((cdf[rows, got] >= target - 1e-12).all())
    assert bool(((got == 0) | (cdf[rows, (got - 1).clamp(min=0)] < target + 1e-12)).all())
    assert bool((probs[rows, got] > 0).all()) and int(got[2]) == 40000


@needs_cuda
@pytest.mark.parametrize("rule", ["greedy", "typical", "rejection"])
def test_device_rules_equal_the_host_rules_on_cuda(rule):
    """The sampled tail's batched rules on CUDA tensors against the per-sequence host rules
    (same keys, same tokens): the keyed draws are integer hashes, the same on every device."""
    from tests.test_acceptance import check_device_rules

    for spec in ("mc_sim_7b_63", "chain:3"):
        check_device_rules(spec, rule, torch.device("cuda"))


@needs_cuda
def test_medusa_lossless_on_gpu_float32_reference_path():
    """float32 on the GPU (torch reference attention; the Triton backend takes only 16-bit):
    Medusa with random heads and with the bundled (sequential) heads gives exactly plain
    greedy's tokens."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=48)
    plain = Engine("default", attention_backend="torch", dtype="float32").generate_batch(PROMPTS, params)
    for heads in ("random", "default"):
        spec = Engine("default", attention_backend="torch", dtype="float32",
                      speculative={"heads": heads, "tree": "mc_sim_7b_63"}).generate_batch(PROMPTS, params)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain], heads


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_agreement_report(dtype):
    """16-bit: how often each path reproduces the torch-reference plain tokens exactly (printed).
    Divergence can only come from rounding at near-ties, which moves with any kernel's
    summation order (bf16 Medusa with random heads read 5, 4 and 2 of 9 prompts identical over
    three versions whose attention was each as accurate as the bf16 reference): what a wrong
    kernel would do instead is diverge at once, so all but two prompts must agree on their
    first 8 tokens."""
    from engine.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=96)
    runs = {}
    for backend in ("torch", "triton"):
        for spec in (None, {"heads": "random", "tree": "mc_sim_7b_63"}):
            eng = Engine("default", attention_backend=backend, speculative=spec, dtype=dtype)
            runs[(backend, spec is not None)] = [o.token_ids for o in eng.generate_batch(PROMPTS, params)]
    ref = runs[("torch", False)]
    for key, toks in runs.items():
        same = sum(a == b for a, b in zip(toks, ref))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(toks, ref)]
        print(f"{dtype} {key}: {same}/{len(ref)} prompts identical; first divergence {first}")
        assert sum(f is None or f >= 8 for f in first) >= len(ref) - 2, (key, first)


@needs_cuda
def test_cuda_graph_replay_equals_eager_forward():
    """A captured decode/verify graph, replayed, gives bit-identical hidden states and cache
    writes (request slots, pad block, scratch) to the same work run eagerly — for padded
    batches — and padding sequences write only into the pad block."""
    import random

    from engine.engine import Engine

    eng = Engine("default", dtype="bfloat16", speculative={"heads": "random", "tree": "mc_sim_7b_63"},
                 max_num_seqs=8, num_blocks=64)
    worker = eng.executor.worker
    runner, cache = worker.runner, worker.kv_cache
    assert eng.num_graphs > 0 and runner.graphs is not None
    torch.manual_seed(0)
    cache.k_all.normal_()
    cache.v_all.normal_()
    page, rng = cache.block_size, random.Random(0)
    pad = runner.graphs.pad_block
    with torch.inference_mode():
        _check_replays(runner, cache, page, pad, rng)
        _check_mixed_replay(runner, cache, page, pad, rng)
    eng.shutdown()


def _check_mixed_replay(runner, cache, page, pad, rng):
    """A mixed graph (first chunks, later chunks, decode tokens), replayed, gives the hidden
    states and cache writes of its work run eagerly, and the padding writes only the pad block."""
    from engine.core.outputs import ScheduledSeq, SchedulerOutput
    from engine.worker.input_batch import InputBatch

    graphs = runner.graphs
    for lens in ([(40, 0), (1, 70), (9, 130)], [(1, 5), (1, 200), (100, 64), (3, 1), (1, 9)]):
        blocks = rng.sample(range(pad), 6 * len(lens))
        seqs = [ScheduledSeq(seq_id=i, token_ids=[rng.randrange(49152) for _ in range(n)], start_pos=ctx,
                             block_table=blocks[6 * i:6 * i + 6], sample=True, params=SamplingParams(temperature=0))
                for i, (n, ctx) in enumerate(lens)]
        batch = InputBatch.build(SchedulerOutput(step_id=1, seqs=seqs), runner.trees, cache.scratch_tokens)
        batch.locate(cache)
        shape = graphs.mixed_shape(seqs)
        assert shape is not None, lens
        g = graphs._graph(shape, graphs.mixed_batch)
        load_inputs(g.buf, g.layout.pack(seqs, batch.ids, batch.positions, batch.slots, pad, cache.pad_slot))
        before = cache.k_all.clone(), cache.v_all.clone()
        eager = g.forward().clone()
        after_eager = cache.k_all.clone()
        cache.k_all.copy_(before[0])
        cache.v_all.copy_(before[1])
        g.replay()
        assert torch.equal(g.hidden, eager) and torch.equal(cache.k_all, after_eager), lens
        changed = set((cache.k_all != before[0]).any(-1).any(-1).any(0).nonzero().flatten().tolist())
        assert changed and changed <= set(batch.slots) | set(range(pad * page, (pad + 1) * page)), lens


def _check_replays(runner, cache, page, pad, rng):
    from engine.core.outputs import ScheduledSeq
    from engine.core.shapes import padded_batch

    scratch0 = cache.scratch_slot0
    for tree in (None, runner.tree):
        for b in (1, 3, 5, 8):
            blocks = rng.sample(range(pad), 6 * b)
            seqs, ids, roots = [], [], []
            for i in range(b):
                ctx = rng.randrange(1, 5 * page)
                table = blocks[6 * i:6 * i + 6]
                cands = [rng.randrange(49152) for _ in range(tree.num_nodes - 1)] if tree else []
                seqs.append(ScheduledSeq(seq_id=i, token_ids=[rng.randrange(49152)], start_pos=ctx, block_table=table,
                                         sample=True, tree_size=len(cands), candidates=cands,
                                         params=SamplingParams(temperature=0)))
                roots.append(table[ctx // page] * page + ctx % page)
                ids += seqs[-1].token_ids + cands
            g = runner.graphs._graph(tree, padded_batch(b))
            load_inputs(g.buf, g.layout.pack(seqs, ids, pad))
            if tree is not None:
                # Make the root's first child the model's own next token, so paths get accepted
                # and the tail's commit has something to write.
                g.replay()
                n = tree.num_nodes
                top = runner.model.lm_head(g.hidden[torch.arange(b, device=g.hidden.device) * n]).argmax(-1).tolist()
                for i, s in enumerate(seqs):
                    s.candidates[0] = ids[i * n + 1] = top[i]
                load_inputs(g.buf, g.layout.pack(seqs, ids, pad))
            before = cache.k_all.clone(), cache.v_all.clone()
            eager = g.forward().clone()
            after_eager = cache.k_all.clone(), cache.v_all.clone()
            cache.k_all.copy_(before[0])
            cache.v_all.copy_(before[1])
            g.replay()
            assert torch.equal(g.hidden, eager), (tree is not None, b)
            assert torch.equal(cache.k_all, after_eager[0]) and torch.equal(cache.v_all, after_eager[1])
            changed = (cache.k_all != before[0]).any(-1).any(-1).any(0).nonzero().flatten().tolist()
            allowed = set(roots) | set(range(pad * page, (pad + 1) * page)) | set(range(scratch0, scratch0 + len(ids)))
            # (A tree step's root K/V was already written by the replay that picked the
            # candidates above, with the same values, so only a plain step must show changes.)
            assert (changed or tree is not None) and set(changed) <= allowed, (tree is not None, b)
            _check_greedy_tail(runner, cache, g, tree, seqs, page, pad)


def _check_greedy_tail(runner, cache, g, tree, seqs, page, pad):
    """The captured greedy tail decides like the host-side rules on the same hidden states and
    commits exactly the accepted nodes' K/V. Reference values are computed over the whole
    padded batch, so every GEMM has the graph's shape (bf16 rounding depends on it)."""
    from engine.sample.acceptance import accept_greedy_batch

    bp, n = g.layout.batch, g.layout.nodes
    lm_head = runner.model.lm_head
    logits = lm_head(g.hidden).view(bp, n, -1)
    toks = g.layout.views(g.buf)["ids"].view(bp, n)
    want = (accept_greedy_batch(tree, toks, logits) if tree is not None
            else [type("A", (), {"path": [0], "bonus": int(x)}) for x in logits[:, 0].argmax(-1)])
    scratch0 = cache.scratch_slot0
    hidden, step_k = g.hidden.clone(), cache.k_all[:, scratch0:scratch0 + bp * n].clone()

    # The greedy decision and its proposal, as DeviceTail.run replays them (captured at
    # start-up after this graph).
    from engine.worker.device_tail import ProposeAfter, TailKey

    key = TailKey(tree, sampled=False)
    assert key in g.tails and ProposeAfter(key) in g.tails
    misses = runner.graphs.misses
    decided = runner.graphs.run_tail(g, key, runner.device_tail.decision(key)).tolist()
    proposed = runner.graphs.run_tail(g, ProposeAfter(key), runner.device_tail.propose, after=key).tolist()
    assert runner.graphs.misses == misses
    rows = [d[:-1] + p for d, p in zip(decided, proposed)]
    depth = tree.depth if tree is not None else 0
    last = torch.tensor([i * n + a.path[-1] for i, a in enumerate(want)], device=hidden.device)
    assert [d[-1] for d in decided] == last.tolist()  # the row the proposal read
    cands = runner.proposer.propose(hidden.index_select(0, last)).tolist()
    for i, (a, r) in enumerate(zip(want, rows)):
        n_acc = len(a.path) - 1
        assert r[0] == n_acc and r[1 + depth] == a.bonus, (i, r[:2 + depth], a.path, a.bonus)
        assert r[1:1 + n_acc] == [toks[i, node].item() for node in a.path[1:]]
        assert r[2 + depth:] == cands[i], i
    for i, (s, a) in enumerate(zip(seqs, want)):
        for d, node in enumerate(a.path[1:], start=1):
            pos = s.start_pos + d
            slot = s.block_table[pos // page] * page + pos % page
            assert torch.equal(cache.k_all[:, slot], step_k[:, i * n + node])
    if tree is not None:
        print(f"greedy tail, batch {len(seqs)}: accepted {[r[0] for r in rows[:len(seqs)]]}")


@needs_cuda
def test_cuda_graphs_give_eager_tokens_end_to_end():
    """Engines with CUDA graphs and with enforce_eager produce the same greedy tokens (plain,
    Medusa with the bundled heads, Medusa with back-off), and the same seeded samples at T=0.7
    with typical acceptance (the captured sampled tail against its eager call). bf16 kernels
    for padded shapes may round differently, so a near-tie can flip; report every prompt and
    require almost all."""
    from engine.core.backoff import BackoffPolicy, LatencyModel, LatencyPoint
    from engine.engine import Engine

    greedy = SamplingParams(temperature=0, max_tokens=64)
    sampled = [SamplingParams(temperature=0.7, seed=i, max_tokens=64) for i in range(len(PROMPTS))]
    for spec, params in ((None, greedy), ({"tree": "mc_sim_7b_63"}, greedy), ({"tree": "auto", "backoff": True}, greedy),
                         ({"tree": "mc_sim_7b_63", "acceptance": "typical"}, sampled)):
        toks = {}
        grid = None
        for eager in (False, True):
            eng = Engine("default", dtype="bfloat16", speculative=spec, enforce_eager=eager, max_num_seqs=16)
            assert (eng.num_graphs == 0) == eager
            if eng.backoff is not None:
                # Both engines take the graph engine's measured latency grid, unlearned: back-off
                # then makes the same choices in both, so the tokens compare like for like
                # (each engine's own timings would pick different trees, and bf16 rounds a
                # verify step and a plain step differently at near-ties).
                grid = grid or eng.step_latency
                eng.backoff = BackoffPolicy(LatencyModel([LatencyPoint(int(b), int(n), ms) for b, n, ms in grid]),
                                            eng.backoff.prior, learning_rate=0.0)
            toks[eager] = ([o.token_ids for o in eng.generate_batch(PROMPTS, params)]
                           + [o.token_ids for p, sp in zip(PROMPTS[:3], params if isinstance(params, list)
                                                            else [params] * 3)
                              for o in eng.generate_batch([p], sp)])
            assert eng.stats.num_capture_steps == 0 and eng.stats.num_graph_miss_steps == 0
            eng.shutdown()
        same = sum(a == b for a, b in zip(toks[True], toks[False]))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                 for a, b in zip(toks[True], toks[False])]
        print(f"graphs vs eager, speculative={spec}, {'sampled' if isinstance(params, list) else 'greedy'}: "
              f"{same}/{len(first)} identical; first divergence {first}")
        assert same >= len(first) - 1


@needs_cuda
def test_no_graph_is_captured_while_serving():
    """Every graph a served step replays was captured at start-up: back-off (learning on) over
    batches of 1 to 40 sequences, prompts from a few tokens to ~1,500 (block tables from 1 to
    25 pages: one width for every graph), greedy and sampled requests alone and side by side,
    top-p filters, a request with logprobs (host-decided), static batches and a queue refilled
    as requests finish — no step captures a graph and none misses one, in the Medusa engine
    and in a plain one. (Medusa's greedy tokens equal plain decoding's in float32 — the CPU
    suite and test_medusa_lossless_on_gpu_float32_reference_path; in bf16 a verify step and a
    plain step round differently and a near-tie can flip: test_16bit_agreement_report.)"""
    import random

    from engine.engine import Engine

    rng = random.Random(0)
    prompts = [p * rng.choice([1, 2, 8, 30]) for p in PROMPTS * 8][:48]
    eng = Engine("default", dtype="bfloat16", speculative={"tree": "auto", "backoff": True}, max_num_seqs=64)
    plain = Engine("default", dtype="bfloat16", max_num_seqs=64)
    for e in (eng, plain):
        assert e.num_graphs > 0 and e.graph_capture_s > 0
    # (The second engine's pools may reuse what the process has cached: only the first must
    # have taken new device memory.)
    assert eng.graph_memory_gb > 0
    print(f"start-up {eng.startup_s:.1f} s: {eng.num_graphs} graphs captured in {eng.graph_capture_s:.1f} s, "
          f"{eng.graph_memory_gb:.2f} GiB")
    greedy = SamplingParams(temperature=0, max_tokens=48)
    kinds = [greedy, SamplingParams(temperature=0.7, seed=1, max_tokens=48),
             SamplingParams(temperature=0.8, top_p=0.9, seed=2, max_tokens=48),
             SamplingParams(temperature=0, max_tokens=16, logprobs=True)]
    for size in (1, 2, 5, 16, 40):
        batch = prompts[:size]
        for params in ([greedy] * size, [kinds[i % len(kinds)] for i in range(size)]):
            for e in (eng, plain):
                outs = e.generate_batch(batch, params)
                assert all(o.token_ids and o.finish_reason in ("stop", "length") for o in outs)
    queue = iter(prompts)  # steady load: at most 24 in flight, refilled at once
    for _ in range(24):
        eng.add_request(next(queue), kinds[rng.randrange(3)])
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished and (p := next(queue, None)) is not None:
                eng.add_request(p, kinds[rng.randrange(3)])
    print("steps by tree size:", eng.stats.steps_by_tree_size)
    assert len(eng.stats.steps_by_tree_size) > 1  # back-off chose several sizes
    assert eng.stats.num_capture_steps == 0 and eng.stats.num_graph_miss_steps == 0
    assert plain.stats.num_capture_steps == 0 and plain.stats.num_graph_miss_steps == 0
    eng.shutdown()
    plain.shutdown()


@needs_cuda
@pytest.mark.parametrize("on_device", [False, True])
def test_a_registered_rule_serves_requests_with_cuda_graphs(on_device):
    """A rule registered by a user — host function only, or with its batched device version —
    serves real steps in a bf16 engine with CUDA graphs: it is called, tokens come out, nothing
    finishes with 'error', no step captures or misses a graph (with a device version its tail
    is captured at start-up as the engine's rule), and the graph engine samples what the same
    engine run eagerly samples. (Against a plain engine bf16 rounds a verify step and a plain
    step differently, and a sampled token flips at a near-tie: the CPU suite checks that
    equality in float32, tests/test_registries.py.)"""
    from engine.engine import Engine
    from engine.sample.acceptance import ACCEPTANCE_RULES, Accepted, register_rule
    from engine.sample.sampler import processed_probs, sample_token

    calls = {"host": 0, "device": 0}

    def device(v):
        calls["device"] += 1
        b = v.tokens.shape[0]
        root = torch.zeros(b, dtype=torch.long, device=v.tokens.device)
        return torch.zeros(b, v.tree.depth + 1, dtype=torch.long, device=root.device), root, v.draw_at(root)

    @register_rule("gpu_root_only", lossless=True, summary="test rule", device=device if on_device else None)
    def root_only(tree, tokens, logits, params, seed, first_pos, epsilon, alpha):
        calls["host"] += 1
        return Accepted([0], sample_token(processed_probs(logits[0], params), params, seed, first_pos))

    try:
        spec = {"tree": "mc_sim_7b_63", "acceptance": "gpu_root_only"}
        params = [SamplingParams(temperature=0.7, seed=i, max_tokens=32) for i in range(len(PROMPTS))]
        toks = {}
        for eager in (False, True):
            calls.update(host=0, device=0)
            eng = Engine("default", dtype="bfloat16", speculative=spec, max_num_seqs=16, enforce_eager=eager)
            outs = eng.generate_batch(PROMPTS, params)
            assert all(o.token_ids and o.finish_reason in ("stop", "length") for o in outs)
            # With a device version no tree step decides on the host (the graph engine called it
            # while capturing its tails, the eager one every step); without, the host decides.
            assert (calls["device"] > 0 and calls["host"] == 0) if on_device else calls["host"] > 0, calls
            assert eng.stats.num_capture_steps == 0 and eng.stats.num_graph_miss_steps == 0
            toks[eager] = [o.token_ids for o in outs]
            eng.shutdown()
        same = sum(a == b for a, b in zip(toks[False], toks[True]))
        print(f"registered rule (device version: {on_device}): graphs vs eager {same}/{len(PROMPTS)} identical")
        assert same >= len(PROMPTS) - 1
    finally:
        ACCEPTANCE_RULES.pop("gpu_root_only")


@needs_cuda
def test_structured_outputs_on_gpu_graphs_equal_eager_and_medusa_equals_plain():
    """Constrained requests on the GPU: the forward graphs replay (no miss, no capture), every
    constraint kind's outputs are valid, and greedy Medusa under each constraint gives plain
    decoding's tokens in the same engine kind (bf16: graphs and eager may flip a near-tie, so
    all but one output must agree, as for free text)."""
    from engine.engine import Engine
    from tests.test_structured_outputs import CONSTRAINTS, PROMPTS as SO_PROMPTS, check_output

    outs = {}
    for name, spec in (("plain", None), ("medusa", {"tree": "mc_sim_7b_63", "acceptance": "greedy"})):
        for eager in (False, True):
            eng = Engine("default", dtype="bfloat16", speculative=spec, enforce_eager=eager, max_num_seqs=16)
            toks = []
            for c in CONSTRAINTS:
                res = eng.generate_batch(SO_PROMPTS, SamplingParams(temperature=0, max_tokens=64, structured_outputs=c),
                                         chat=True)
                for o in res:
                    if o.finish_reason == "stop":
                        check_output(c, o.text)
                toks += [o.token_ids for o in res]
            assert eng.stats.num_capture_steps == 0 and (eager or eng.stats.num_graph_miss_steps == 0)
            assert len(eng.structured) == 0
            eng.shutdown()
            outs[(name, eager)] = toks
    for a, b in ((("plain", False), ("plain", True)), (("medusa", False), ("medusa", True)),
                 (("plain", False), ("medusa", False))):
        same = sum(x == y for x, y in zip(outs[a], outs[b]))
        print(f"structured outputs, {a} vs {b}: {same}/{len(outs[a])} identical")
        assert same >= len(outs[a]) - 1


@needs_cuda
def test_adaptive_trees_on_gpu_medusa_equals_plain(monkeypatch):
    """Adaptive trees (every sequence its own) in ragged steps' CUDA graphs, decided by the
    greedy ragged tail. Exactly: every ragged step's decision (accepted tokens and bonus) is the
    host decider's on the same logits. In bf16 against plain decoding and against the eager
    engine (host path, the ragged tree kernel): outputs may part at a near-tie, which any
    change of summation order moves (test_16bit_agreement_report) — a wrong step would part at
    once, so all but two of 16 agree on their first 8 tokens. Trees of several sizes run in one
    step, no step misses a graph, no KV block leaks."""
    from engine.engine import Engine
    from engine.sample.host_decision import logits_rows
    from engine.worker.model_runner import ModelRunner
    from tests.test_adaptive import _device

    checked = []
    ragged_step = ModelRunner._ragged_step

    def check(self, batch, graph, defer):
        logits = self.model.lm_head(graph.hidden[:graph.shape.num_tokens])  # (the tail's very GEMM)
        ranges, rows = logits_rows(batch.seqs, batch.offsets)
        host = self.host.decide(batch.seqs, ranges, logits[torch.tensor(rows, device=logits.device)], batch.seq_trees)
        result = ragged_step(self, batch, graph, defer)
        checked.append([r.sampled_token_ids == d.tokens for r, d in zip(result.results, host)])
        return result

    monkeypatch.setattr(ModelRunner, "_ragged_step", check)
    prompts = (PROMPTS * 2)[:16]
    sp = SamplingParams(temperature=0, max_tokens=64)
    plain = Engine("default", dtype="bfloat16", max_num_seqs=16)
    ref = [o.token_ids for o in plain.generate_batch(prompts, sp, chat=True)]
    plain.shutdown()
    outs = {}
    for eager in (False, True):
        eng = Engine("default", dtype="bfloat16", max_num_seqs=16, enforce_eager=eager,
                     speculative={"tree": "mc_sim_7b_63", "acceptance": "greedy", "adaptive": True})
        # Verifying priced as cheap (learning off): this test is about the ragged steps.
        eng.policy.adaptive.latency, eng.policy.adaptive.learning_rate = _device(0.001), 0.0
        outs[eager] = [o.token_ids for o in eng.generate_batch(prompts, sp, chat=True)]
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(outs[eager], ref)]
        print(f"adaptive trees on the GPU ({'eager' if eager else 'graphs'}): "
              f"{sum(f is None for f in first)}/{len(ref)} outputs identical to plain decoding, first divergence "
              f"{first}; steps by tree size {eng.stats.steps_by_tree_size}; graph-miss steps "
              f"{eng.stats.num_graph_miss_steps}; ragged steps {len(checked)}")
        assert sum(f is None or f >= 8 for f in first) >= len(ref) - 2
        assert sum(n for n in eng.stats.steps_by_tree_size if n > 0) > 0
        assert eng.stats.num_graph_miss_steps == 0
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        eng.shutdown()
        if not eager:
            assert checked and all(all(step) for step in checked), checked
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(outs[False], outs[True])]
    assert sum(f is None or f >= 8 for f in first) >= len(ref) - 2, first
