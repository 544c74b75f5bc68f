"""Model architectures this engine runs: one registration per HF ``architectures`` name.

A new architecture is one module with a model class (same constructor and forward as
``engine.models.llama.LlamaForCausalLM``: HF weight names, an attention backend for the paged
cache, ``fuse()`` after loading) plus one ``register_model`` call here. ``check`` refuses
configurations the class cannot run exactly (it raises ValueError naming the config field).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # HF config.json "architectures" entry
    model_type: str  # HF config.json "model_type" (used when "architectures" is missing)
    model_class: str  # "module:Class"
    # Extra validation of the HF config for this architecture (raises ValueError).
    check: Optional[Callable[[dict[str, Any]], None]] = None
    # HF configs of this family carry biases on Q/K/V by default.
    default_attention_bias: bool = False

    def load_class(self) -> type:
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.architecture in MODEL_REGISTRY:
        raise ValueError(f"model architecture {spec.architecture!r} is registered twice")
    MODEL_REGISTRY[spec.architecture] = spec
    return spec


def find_model(cfg: dict[str, Any]) -> ModelSpec:
    """The registered architecture of an HF config.json (by "architectures", else "model_type")."""
    archs = cfg.get("architectures") or [s.architecture for s in MODEL_REGISTRY.values()
                                         if s.model_type == cfg.get("model_type")]
    spec = next((MODEL_REGISTRY[a] for a in archs if a in MODEL_REGISTRY), None)
    if spec is None:
        raise ValueError(f"config.json architectures={archs!r}: unsupported; this engine runs "
                         f"{', '.join(MODEL_REGISTRY)}")
    if spec.check is not None:
        spec.check(cfg)
    return spec


def _no_sliding_window(cfg: dict[str, Any]) -> None:
    # A sliding window narrower than the context changes the attention pattern.
    window = cfg.get("sliding_window")
    if window not in (None, 0) and window < cfg.get("max_position_embeddings", 0):
        raise ValueError(f"config.json sliding_window={window}: Mistral sliding-window attention is not supported")


_LLAMA = "engine.models.llama:LlamaForCausalLM"
register_model(ModelSpec("LlamaForCausalLM", "llama", _LLAMA))
register_model(ModelSpec("MistralForCausalLM", "mistral", _LLAMA, check=_no_sliding_window))
register_model(ModelSpec("Qwen2ForCausalLM", "qwen2", _LLAMA, default_attention_bias=True))
