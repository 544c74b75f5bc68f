"""The torch reference attention (the CPU path) against attention written out token by token:
each query attends to its sequence's cached prefix and to the step's own tokens its mask shows
(causal for decode tokens and prompt chunks, the ancestor mask for a tree)."""

import math

import pytest
import torch

from engine.attention.base import SeqAttn, StepAttnInputs
from engine.attention.kv_cache import PagedKVCache
from engine.attention.torch_ref import TorchAttentionBackend

BLOCK, HEADS, KV_HEADS, DIM = 8, 4, 2, 16
TREE = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)


def naive(cache_k, cache_v, q, k, v, seqs, prefix_slots, starts):
    out = torch.empty_like(q)
    rep = HEADS // KV_HEADS
    for s, slots, start in zip(seqs, prefix_slots, starts):
        mask = s.tree_mask if s.tree_mask is not None else torch.tril(torch.ones(s.q_len, s.q_len, dtype=torch.bool))
        for i in range(s.q_len):
            own = [start + j for j in range(s.q_len) if mask[i, j]]
            keys = torch.cat([cache_k[slots], k[own]])  # [n, KVH, D]
            vals = torch.cat([cache_v[slots], v[own]])
            for h in range(HEADS):
                w = torch.softmax(keys[:, h // rep] @ q[start + i, h] / math.sqrt(DIM), dim=0)
                out[start + i, h] = w @ vals[:, h // rep]
    return out


@pytest.mark.parametrize("case", ["decode, equal contexts", "decode, unequal contexts", "trees and chunks",
                                  "decodes, then a chunk"])
@torch.inference_mode()
def test_torch_reference_attention_matches_attention_written_out(case):
    torch.manual_seed(0)
    cache = PagedKVCache(1, 32, BLOCK, KV_HEADS, DIM, torch.float32, torch.device("cpu"), scratch_tokens=16)
    cache.k_all.normal_()
    cache.v_all.normal_()
    tables = [[3, 4, 5], [9, 1, 2], [6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    seqs = {"decode, equal contexts": [SeqAttn(1, 11, tables[0]), SeqAttn(1, 11, tables[1])],
            "decode, unequal contexts": [SeqAttn(1, 11, tables[0]), SeqAttn(1, 4, tables[1])],
            "trees and chunks": [SeqAttn(4, 11, tables[0], tree_mask=TREE), SeqAttn(1, 4, tables[1]),
                                 SeqAttn(85, 3, tables[2])],  # 85 tokens: a long block, its own group
            "decodes, then a chunk": [SeqAttn(1, 11, tables[0]), SeqAttn(1, 11, tables[1]), SeqAttn(85, 3, tables[2])]}[case]
    slots, prefix_slots, starts, off = [], [], [], 0
    scratch = cache.scratch_slot0
    for s in seqs:
        starts.append(off)
        off += s.q_len
        prefix_slots.append(cache.host_slots(s.block_table, 0, s.ctx_len))
        if s.tree_mask is not None:  # tree nodes write to scratch rows
            slots += list(range(scratch, scratch + s.q_len))
            scratch += s.q_len
        else:
            slots += cache.host_slots(s.block_table, s.ctx_len, s.q_len)
    q, k, v = torch.randn(off, HEADS, DIM), torch.randn(off, KV_HEADS, DIM), torch.randn(off, KV_HEADS, DIM)
    expected = naive(cache.k[0].clone(), cache.v[0].clone(), q, k, v, seqs, prefix_slots, starts)
    backend = TorchAttentionBackend(cache, torch.device("cpu"))
    meta = backend.prepare(StepAttnInputs(seqs=seqs, slot_mapping=torch.tensor(slots)))
    if case.startswith("decode"):  # the decode tokens come first, unpadded: their queries are a view
        assert meta.groups[0].dense
        assert (meta.groups[0].mask is None) == (case != "decode, unequal contexts")  # nothing to hide
    got = backend.forward(0, q, k, v, meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The step's K/V landed at its slots.
    assert torch.equal(cache.k[0][torch.tensor(slots)], k) and torch.equal(cache.v[0][torch.tensor(slots)], v)


@torch.inference_mode()
def test_bf16_cpu_attention_gives_a_token_the_same_bits_alone_as_in_a_batch():
    """16-bit on a CPU (the bf16 mode): every short-block token attends on its own over its
    prefix and its own path, so a decode token's output is the same bits alone and beside a
    tree and another sequence; and it is attention (within bf16 of the written-out one)."""
    torch.manual_seed(0)
    cache = PagedKVCache(1, 32, BLOCK, KV_HEADS, DIM, torch.bfloat16, torch.device("cpu"), scratch_tokens=16)
    cache.k_all.normal_()
    cache.v_all.normal_()
    backend = TorchAttentionBackend(cache, torch.device("cpu"))
    assert backend.batch_invariant
    tables = [[3, 4, 5], [9, 1, 2]]
    decode = SeqAttn(1, 13, tables[1])
    tree = SeqAttn(4, 11, tables[0], tree_mask=TREE)
    q, k, v = (torch.randn(5, n, DIM).bfloat16() for n in (HEADS, KV_HEADS, KV_HEADS))
    tree_slots = list(range(cache.scratch_slot0, cache.scratch_slot0 + 4))
    decode_slot = cache.host_slots(decode.block_table, 13, 1)
    expected = naive(cache.k[0].float(), cache.v[0].float(), q.float(), k.float(), v.float(), [tree, decode],
                     [cache.host_slots(tables[0], 0, 11), cache.host_slots(tables[1], 0, 13)], [0, 4])
    batched = backend.forward(0, q, k, v, backend.prepare(StepAttnInputs([tree, decode], torch.tensor(tree_slots + decode_slot))))
    torch.testing.assert_close(batched.float(), expected, rtol=3e-2, atol=3e-2)
    alone = backend.forward(0, q[4:], k[4:], v[4:], backend.prepare(StepAttnInputs([decode], torch.tensor(decode_slot))))
    assert torch.equal(alone, batched[4:])
