"""Medusa heads: K heads on the frozen base model's last hidden state h_t; head k guesses token
t+k+2 (the base lm_head gives t+1). Each head is ``num_layers`` ResBlocks (x + SiLU(Wx + b), W
zero-initialised for training) followed by a vocab projection: its own (original Medusa) or the
base model's lm_head, shared (small checkpoints).

Three head kinds (config.json ``medusa_head_kind``), by what a head reads besides h_t:
- ``medusa`` (Medusa-1): nothing. Every head guesses blind to the tokens between.
- ``root_conditioned``: the token t+1 — the *root* of the next tree, which the base model has
  already decided when the heads propose (the bonus token of the step that just ended). Head 1
  no longer has to guess which token comes between, the largest single source of its errors
  (EAGLE's ablation: feature plus the shifted token, not the feature alone). The root is the
  same for the whole tree, so proposing stays one pass over K heads.
- ``sequential`` (Hydra, Ankner et al. 2024): head k reads the root and the k candidate tokens
  on the tree path above the node it fills, so every node's guess is conditioned on its own
  ancestors. Proposing runs depth by depth (head k once per tree node at depth k that has
  children). Trained with teacher forcing, a head's held-out accuracy is then exactly the
  probability that the node is accepted given its parent was, which is what tree.json's
  tree construction multiplies.
Context enters additively before the ResBlocks: head k starts from h_t + P_k [e(x_1); …; e(x_c)]
(e: the base model's frozen token embedding, P_k a learned [H, c·H] map, zero-initialised so
training starts at Medusa-1).

Checkpoint layout (FasterDecoding/Medusa): a directory with ``config.json`` (medusa_num_heads,
medusa_num_layers, base_model_name_or_path) and ``medusa_lm_head.safetensors`` (or ``.pt``)
with keys ``{head}.{layer}.linear.weight|bias`` and ``{head}.{num_layers}.weight``. Shared
heads omit the last key and set ``medusa_shared_lm_head: true``. Root-conditioned and sequential
heads add ``path_proj.{head}.weight`` [H, c·H] (c = 1, resp. head + 1 context tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The heads shipped for the bundled default model (``speculative={"heads": "default"}``).
BUNDLED_HEADS_DIR = Path(__file__).resolve().parent / "bundled_heads"

WEIGHTS_SAFETENSORS = "medusa_lm_head.safetensors"
WEIGHTS_PT = "medusa_lm_head.pt"
HEAD_KINDS = ("medusa", "root_conditioned", "sequential")


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int,
                 shared_lm_head: bool = True, kind: str = "medusa") -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"heads: medusa_head_kind must be one of {HEAD_KINDS}, got {kind!r}")
        self.num_heads, self.num_layers = num_heads, num_layers
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.shared_lm_head, self.kind = shared_lm_head, kind
        self.path_proj: Optional[nn.ModuleList] = None
        if kind != "medusa":
            self.path_proj = nn.ModuleList(nn.Linear(self.context_tokens(k) * hidden_size, hidden_size, bias=False)
                                           for k in range(num_heads))
            for proj in self.path_proj:
                nn.init.zeros_(proj.weight)
        self.heads = nn.ModuleList()
        for _ in range(num_heads):
            blocks: list[nn.Module] = [ResBlock(hidden_size) for _ in range(num_layers)]
            if not shared_lm_head:
                blocks.append(nn.Linear(hidden_size, vocab_size, bias=False))
            self.heads.append(nn.Sequential(*blocks))

    def context_tokens(self, k: int) -> int:
        """How many tokens of the path head k reads: none, the root, or the root and k candidates."""
        return {"medusa": 0, "root_conditioned": 1, "sequential": k + 1}[self.kind]

    @property
    def root_conditioned(self) -> bool:
        """The heads read the root token (root-conditioned and sequential heads)."""
        return self.kind != "medusa"

    def inputs(self, h: torch.Tensor, path_emb: Optional[torch.Tensor]) -> torch.Tensor:
        """[N, H] and the path's embeddings [N, K, H] (the root, then the tokens at depths
        1…K-1) → each head's input [N, K, H]."""
        if self.path_proj is None:
            return h[:, None, :].expand(-1, self.num_heads, -1)
        if path_emb is None:
            raise ValueError(f"heads: {self.kind} heads need the embedding of each sequence's root token"
                             + (" and tree path" if self.kind == "sequential" else ""))
        ctx = [proj(path_emb[:, : self.context_tokens(k)].flatten(1).to(h.dtype)) for k, proj in enumerate(self.path_proj)]
        return h[:, None, :] + torch.stack(ctx, dim=1)

    def hidden(self, h: torch.Tensor, path_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, H] → [N, K, H]: every head's features before the vocab projection."""
        x0 = self.inputs(h, path_emb)
        outs = []
        for k, head in enumerate(self.heads):
            x = x0[:, k]
            for blk in list(head)[: self.num_layers]:
                x = blk(x)
            outs.append(x)
        return torch.stack(outs, dim=1)

    def logits(self, h: torch.Tensor, base_lm_head: nn.Linear, path_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, H] → [N, K, V] float32 (teacher forcing: path_emb holds the true path)."""
        feats = self.hidden(h, path_emb)
        if self.shared_lm_head:
            return base_lm_head(feats).float()
        return torch.stack([head[-1](feats[:, k]) for k, head in enumerate(self.heads)], 1).float()

    def randomize(self, seed: int, std: float = 0.02) -> "MedusaHeads":
        """Untrained but distinct heads (tests: low acceptance, output must still be exact)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    # ---- checkpoint layout ------------------------------------------------------------
    def state_dict_medusa(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("heads."): v.detach().contiguous() for k, v in self.state_dict().items()}

    def save(self, path: str | Path, base_model: str = "", extra: Optional[dict] = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
            "base_model_name_or_path": base_model,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "medusa_shared_lm_head": self.shared_lm_head,
            "medusa_head_kind": self.kind,
            **(extra or {}),
        }
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_file(self.state_dict_medusa(), str(path / WEIGHTS_SAFETENSORS))

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, vocab_size: int) -> "MedusaHeads":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"heads: {str(path)!r} has no config.json")
        cfg = json.loads(cfg_file.read_text())
        for key in ("medusa_num_heads", "medusa_num_layers"):
            if key not in cfg:
                raise ValueError(f"heads: {cfg_file} is missing {key!r}")
        if (path / WEIGHTS_SAFETENSORS).is_file():
            state = load_file(str(path / WEIGHTS_SAFETENSORS))
        elif (path / WEIGHTS_PT).is_file():
            state = torch.load(str(path / WEIGHTS_PT), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"heads: {str(path)!r} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_PT}")
        k, layers = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
        shared = f"0.{layers}.weight" not in state
        heads = cls(k, layers, hidden_size, vocab_size, shared_lm_head=shared,
                    kind=cfg.get("medusa_head_kind", "medusa"))
        expected = heads.state_dict_medusa()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"heads: {str(path)!r} is missing weights {missing[:4]}")
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise ValueError(f"heads: {str(path)!r} has weights its config.json does not describe {unknown[:4]} "
                             f"(medusa_head_kind={heads.kind!r}, medusa_num_layers={layers})")
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise ValueError(
                    f"heads: weight {name} has shape {tuple(state[name].shape)}, but the base model "
                    f"needs {tuple(ref.shape)} (hidden_size={hidden_size}, vocab_size={vocab_size})"
                )
        heads.load_state_dict({n if n.startswith("path_proj.") else f"heads.{n}": state[n] for n in expected})
        return heads


# ---- vLLM's Medusa layout -----------------------------------------------------------------
# vLLM (vllm/model_executor/models/medusa.py) names ResBlock i of head h
# ``blocks.{h}.layers.{i}.weight|bias`` and head h's projection ``lm_heads.{h}.weight``; its
# config has model_type "medusa", num_heads, num_hidden_layers (ResBlocks per head),
# hidden_size, vocab_size, truncated_vocab_size, medusa_fc_bias and original_lm_head (one
# projection shared by all heads, stored as lm_heads.0.weight). Mapping to the FasterDecoding
# layout: ``{h}.{i}.linear.*`` ↔ ``blocks.{h}.layers.{i}.*``, ``{h}.{L}.weight`` ↔
# ``lm_heads.{h}.weight``; shared heads export a copy of the base model's lm_head.

def export_vllm(heads: MedusaHeads, path: str | Path, base_lm_head: Optional[torch.Tensor] = None) -> None:
    if heads.kind != "medusa":
        raise ValueError(f"export: vLLM's Medusa layout has no {heads.kind} heads (medusa_head_kind "
                         f"{heads.kind!r}); only Medusa-1 heads export")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for h, head in enumerate(heads.heads):
        for i in range(heads.num_layers):
            state[f"blocks.{h}.layers.{i}.weight"] = head[i].linear.weight.detach().contiguous()
            state[f"blocks.{h}.layers.{i}.bias"] = head[i].linear.bias.detach().contiguous()
        if not heads.shared_lm_head:
            state[f"lm_heads.{h}.weight"] = head[-1].weight.detach().contiguous()
    if heads.shared_lm_head:
        if base_lm_head is None:
            raise ValueError("export: shared heads need the base model's lm_head weight (vLLM stores it)")
        state["lm_heads.0.weight"] = base_lm_head.detach().contiguous().clone()
    config = {
        "model_type": "medusa", "architectures": ["MedusaModel"],
        "num_heads": heads.num_heads, "num_hidden_layers": heads.num_layers,
        "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size,
        "truncated_vocab_size": heads.vocab_size, "medusa_fc_bias": True,
        "original_lm_head": heads.shared_lm_head,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(path / "model.safetensors"))


def load_vllm(path: str | Path) -> tuple[MedusaHeads, Optional[torch.Tensor]]:
    """Heads from vLLM's layout, and the shared lm_head weight when ``original_lm_head``."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "medusa":
        raise ValueError(f"heads: {path}/config.json is not a vLLM Medusa config (model_type={cfg.get('model_type')!r})")
    state = load_file(str(path / "model.safetensors"))
    shared = bool(cfg.get("original_lm_head", False))
    heads = MedusaHeads(cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"],
                        shared_lm_head=shared)
    ours = {}
    for h in range(heads.num_heads):
        for i in range(heads.num_layers):
            for kind in ("weight", "bias"):
                ours[f"heads.{h}.{i}.linear.{kind}"] = state[f"blocks.{h}.layers.{i}.{kind}"]
        if not shared:
            ours[f"heads.{h}.{heads.num_layers}.weight"] = state[f"lm_heads.{h}.weight"]
    heads.load_state_dict(ours)
    return heads, state.get("lm_heads.0.weight") if shared else None
