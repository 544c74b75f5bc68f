"""Attention backends, by name: each declares the devices and dtypes it runs and whether CUDA
graphs can capture its steps. A new backend is one module (see base.py for the interface)
plus one ``register_backend`` call here; ``attention_backend="auto"`` takes the first
registered backend that supports the engine's device and dtype."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSpec:
    name: str
    backend_class: str  # "module:Class", imported on first use
    devices: frozenset[str]  # torch device types
    dtypes: frozenset[str]  # torch dtype names
    cuda_graphs: bool  # decode/verify steps can be captured (metadata refreshed in place)
    block_size_multiple: int = 1  # the paged kernels' page-size constraint
    why: str = ""  # what limits it, for error messages

    def supports(self, device_type: str, dtype: str) -> bool:
        return device_type in self.devices and dtype in self.dtypes

    def build(self, kv_cache, device):
        module, name = self.backend_class.split(":")
        return getattr(importlib.import_module(module), name)(kv_cache, device)


ATTENTION_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    if spec.name in ATTENTION_BACKENDS or spec.name == "auto":
        raise ValueError(f"attention backend {spec.name!r}: name taken")
    ATTENTION_BACKENDS[spec.name] = spec
    return spec


def check_backend(name: str) -> None:
    """ValueError naming the field unless ``name`` is "auto" or a registered backend."""
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: expected 'auto' or one of {sorted(ATTENTION_BACKENDS)}, got {name!r}")


def select_backend(name: str, device_type: str, dtype: str) -> BackendSpec:
    """The backend called ``name`` ("auto": the first that supports the device and dtype);
    ValueError naming the field when it cannot run them."""
    if name == "auto":
        for spec in ATTENTION_BACKENDS.values():
            if spec.supports(device_type, dtype):
                return spec
        raise ValueError(f"attention_backend: no backend runs dtype={dtype} on {device_type}")
    check_backend(name)
    spec = ATTENTION_BACKENDS[name]
    if device_type not in spec.devices:
        raise ValueError(f"attention_backend: {name!r} runs on {sorted(spec.devices)}, not {device_type}{spec.why}")
    if dtype not in spec.dtypes:
        raise ValueError(f"dtype: attention_backend {name!r} takes {sorted(spec.dtypes)}, not {dtype}{spec.why}; "
                         "use attention_backend='auto' to pick one that does")
    return spec


# Preference order for "auto": the Triton kernels on CUDA, then the torch reference.
register_backend(BackendSpec(
    "triton", "engine.attention.triton_backend:TritonAttentionBackend", frozenset({"cuda"}),
    frozenset({"bfloat16", "float16"}), cuda_graphs=True, block_size_multiple=64,
    why=" (Triton paged kernels and xformers' flash prefill: 16-bit only, no CPU kernels)"))
register_backend(BackendSpec(
    "torch", "engine.attention.torch_ref:TorchAttentionBackend", frozenset({"cpu", "cuda"}),
    frozenset({"float32", "bfloat16", "float16"}), cuda_graphs=False))
