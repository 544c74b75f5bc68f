"""ArchConfig: the shape of a model, read from its HF config.json (no torch, no model code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from engine.models.registry import find_model


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    # Every token id that ends generation (config.json's eos_token_id, an int or a list).
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ArchConfig":
        spec = find_model(cfg)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"config.json: missing required field {key!r}")
        num_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"config.json rope_scaling type {kind!r}: only 'llama3' is supported")
            if kind != "llama3":
                scaling = None
        return cls(
            architecture=spec.architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", spec.default_attention_bias)),
            eos_token_ids=eos_ids(cfg.get("eos_token_id")),
        )


def eos_ids(value: Any) -> tuple[int, ...]:
    """config.json / generation_config.json eos_token_id (None, an int or a list) → ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
