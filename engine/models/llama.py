"""Llama-family decoder (Llama, Mistral without sliding window, Qwen2) over a paged KV cache.

Module names follow the HF checkpoints (``model.layers.N.self_attn.q_proj`` …) so a state dict
loads as it is. Attention is delegated to an attention backend (engine/attention), which reads
and writes the paged cache; the model itself is stateless between steps.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from engine.models.config import ArchConfig
from engine.models.ops import EAGER_OPS, ModelOps
from engine.models.parallel import ShardPlan, TPGroup


def rope_inv_freq(cfg: ArchConfig) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is not None:  # llama3: scale low frequencies, keep high ones, blend in between
        factor = s["factor"]
        low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: ModelOps = EAGER_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def _concat_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side (one GEMM instead of several)."""
    w = torch.cat([p.weight for p in parts])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


class Attention(nn.Module):
    """This rank's query heads (column-parallel QKV) and its part of O (row-parallel, all-reduced).
    Loaded as HF's q/k/v_proj; ``fuse()`` then merges them into one qkv_proj."""

    def __init__(self, cfg: ArchConfig, layer_idx: int, plan: ShardPlan, tp: TPGroup) -> None:
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.num_heads, self.num_kv_heads, self.head_dim = plan.num_q_heads, plan.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=b)
        self.o_proj = nn.Linear(self.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: Optional[nn.Linear] = None

    def fuse(self) -> None:
        self.qkv_proj = _concat_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, backend, meta, ops: ModelOps = EAGER_OPS) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = ops.qkv_rope(linear(self.qkv_proj, x), cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        out = backend.forward(self.layer_idx, q, k, v, meta)
        return self.tp.all_reduce(linear(self.o_proj, out.reshape(t, self.num_heads * self.head_dim)))


# Row counts a float32 CPU step runs through oneDNN's blocked weights (``block_cpu_weights``):
# decode and verify steps of a few sequences and tree nodes. MKL's GEMM reads the weights about
# once for 1-3 rows but re-reads them from 4 rows on; a blocked layout reads them once for a few
# dozen rows (docs/performance.md, "The CPU decode step's GEMMs").
CPU_BLOCKED_ROWS = (4, 64)
# bfloat16 on a CPU runs every row count through oneDNN's prepacked bf16 weight, in calls of at
# most this many rows: up to 32 rows oneDNN's bf16 kernel gives a row the same bits whatever
# the rows beside it, not beyond (another kernel) — so a row's logits do not depend on the
# batch or the tree it is verified in (docs/performance.md, "The opt-in bf16 CPU mode").
CPU_BF16_CALL_ROWS = 32


def _packed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x @ layer.weight.T`` (+ bias): the one place the model's projections run. On a CPU with
    a packed copy of the weight (``block_cpu_weights``): float32 uses it for 4-64 rows,
    bfloat16 for every row count, ``CPU_BF16_CALL_ROWS`` rows a call."""
    packed = getattr(layer, "cpu_blocked_weight", None)
    if packed is not None and x.dim() == 2:
        rows = x.shape[0]
        if x.dtype == torch.bfloat16:
            if rows <= CPU_BF16_CALL_ROWS:
                return _packed(x, packed, layer.bias)
            return torch.cat([_packed(part, packed, layer.bias) for part in x.split(CPU_BF16_CALL_ROWS)])
        if CPU_BLOCKED_ROWS[0] <= rows <= CPU_BLOCKED_ROWS[1]:
            return _packed(x, packed, layer.bias)
    return nn.functional.linear(x, layer.weight, layer.bias)


def cpu_bf16_gemm_available() -> bool:
    """Whether this CPU's oneDNN runs bf16 GEMMs (AVX-512 or AMX): what a bfloat16 model on a
    CPU needs (``block_cpu_weights``)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class MLP(nn.Module):
    """This rank's intermediate features (column-parallel gate/up, row-parallel down)."""

    def __init__(self, cfg: ArchConfig, plan: ShardPlan, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        inter = len(plan.intermediate)
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        self.gate_up_proj: Optional[nn.Linear] = None

    def fuse(self) -> None:
        self.gate_up_proj = _concat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, ops: ModelOps = EAGER_OPS) -> torch.Tensor:
        return self.tp.all_reduce(linear(self.down_proj, ops.silu_mul(linear(self.gate_up_proj, x))))


class VocabParallelLMHead(nn.Linear):
    """The lm_head rows of this rank's vocabulary slice; returns full-vocabulary logits on every
    rank (all-gather), so callers (sampling, Medusa heads sharing it) never see the split."""

    def __init__(self, hidden: int, plan: ShardPlan, tp: TPGroup) -> None:
        super().__init__(hidden, len(plan.vocab), bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_vocab(linear(self, x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int, plan: ShardPlan, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, plan, tp)
        self.mlp = MLP(cfg, plan, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, backend, meta, ops: ModelOps) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output (not yet added to the residual stream, so the add and
        this layer's norm are one fused op), residual: the stream (None before layer 0)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x, ops)
        else:
            h, residual = ops.add_rms_norm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        h = self.self_attn(h, cos, sin, backend, meta, ops)
        h, residual = ops.add_rms_norm(h, residual, self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.eps)
        return self.mlp(h, ops), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ArchConfig, plan: ShardPlan, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(len(plan.vocab), cfg.hidden_size)  # this rank's vocab rows
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, plan, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole model (default) or one tensor-parallel rank's shard of it (``plan``, ``tp``)."""

    def __init__(self, cfg: ArchConfig, plan: Optional[ShardPlan] = None, tp: Optional[TPGroup] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.plan = plan if plan is not None else ShardPlan.full(cfg)
        self.tp = tp if tp is not None else TPGroup(self.plan)
        self.model = DecoderModel(cfg, self.plan, self.tp)
        self.lm_head = VocabParallelLMHead(cfg.hidden_size, self.plan, self.tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.ops = EAGER_OPS

    def init_buffers(self, device: torch.device) -> None:
        """Compute the non-persistent buffers (RoPE frequencies) for real on ``device``: a model
        built on the meta device and loaded with ``assign=True`` has none."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def fuse(self, compiled: bool) -> "LlamaForCausalLM":
        """After loading: one GEMM for Q/K/V and one for gate/up per layer, and (``compiled``,
        CUDA) the elementwise work through torch.compile and Triton — fewer kernels per step."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if compiled:
            from engine.models.ops import cuda_ops

            self.ops = cuda_ops(self.cfg.head_dim)
        return self

    def block_cpu_weights(self) -> "LlamaForCausalLM":
        """On a CPU with oneDNN: give every projection (and the lm_head) a second copy of its
        weight in oneDNN's packed layout, which ``linear`` uses — float32: for 4-64 rows (fewer
        rows keep MKL's GEMM, whose 1-3-row path is the fastest, and prompts keep it too);
        bfloat16: for every row count (``cpu_bf16_gemm_available`` must hold: the engine
        checks). One more copy of the weights in memory."""
        dtype = self.lm_head.weight.dtype
        if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
            return self
        if dtype == torch.bfloat16 and not cpu_bf16_gemm_available():
            return self
        layers = [self.lm_head] + [m for layer in self.model.layers
                                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        for m in layers:
            m.cpu_blocked_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend, meta) -> torch.Tensor:
        """input_ids, positions: [T] flat over the batch. Returns final-norm hidden states [T, H]."""
        if self.model.layers[0].self_attn.qkv_proj is None:
            raise RuntimeError("LlamaForCausalLM: call fuse() after loading the weights (load_model does)")
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed(input_ids)
        cos, sin = emb.cos()[:, None, :].to(x.dtype), emb.sin()[:, None, :].to(x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, backend, meta, self.ops)
        norm = self.model.norm
        return self.ops.add_rms_norm(x, residual, norm.weight, norm.eps)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] (also the input of root-conditioned Medusa heads)."""
        if self.tp.world_size == 1:
            return self.model.embed_tokens(input_ids)
        # Vocab-parallel lookup: rows outside this rank's slice contribute zeros to the sum.
        local = input_ids - self.plan.vocab.start
        inside = (local >= 0) & (local < len(self.plan.vocab))
        x = self.model.embed_tokens(local.clamp(0, len(self.plan.vocab) - 1)) * inside[:, None].to(self.dtype)
        return self.tp.all_reduce(x)

    def embed_table(self) -> Optional[torch.Tensor]:
        """The whole token embedding matrix [V, H], or None where this rank holds a vocab slice."""
        return self.model.embed_tokens.weight if self.tp.world_size == 1 else None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
