"""Every Triton kernel of the engine, one file per op, its launcher beside it:

    tree_attention.py      decode and verify attention over the paged prefix + a tree (split-K)
    varlen_attention.py    prefill chunks and decode tokens of a mixed step, causal, paged
    varlen_tiles.py        the varlen kernel's query tiling (host side, no Triton)
    online_softmax.py      the paged K/V tile read and online-softmax step both attentions share
    kv_write.py            K and V into their slots; a commit's rows of every layer in one launch
    rope_silu.py           RoPE on the fused QKV projection, SiLU·mul
    proposal.py            the heads' ResBlocks, a sequential head's input
    topk.py                row-wise top-k (into a tree's node columns)
    keyed_sampling.py      the keyed uniform draw and inverse-CDF sampling (bit for bit the host's)
    decision.py            a verify step's greedy decision, any decision's rows and commit slots
    typical_acceptance.py  typical acceptance read straight from the logits

Callers ask one question before launching any of them: ``triton_applies(x)``. An op's own
shape limits (RoPE's power-of-two head_dim, top-k's row width) sit beside its launcher and are
asked after this one. Importing this package loads neither torch nor Triton: the CPU path
never touches Triton, and each kernel module is imported where it is first launched.
"""

from __future__ import annotations

from typing import Any


def triton_applies(*on: Any) -> bool:
    """Do the engine's Triton kernels run on these tensors or devices? Exactly when all are on
    CUDA: torch's CUDA builds ship Triton (the attention backend needs it already), and the
    torch ops serve every other device with the same answers."""
    return bool(on) and all((x.type if hasattr(x, "type") and not callable(x.type) else x.device.type) == "cuda"
                            for x in on)
