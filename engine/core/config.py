"""Engine configuration: msgspec Structs, validated on construction.

Every Struct checks its own fields in ``__post_init__`` and raises ``ValueError`` naming the
field and what is allowed, so a bad configuration fails before any weight is loaded. The names
of registered parts (attention backends, acceptance rules) live in registries of the floors
that own them; ``Engine`` checks them against those, still before any weight is loaded.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec


def _check(cond: bool, field: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{field}: expected {expected}, got {got!r}")


class ModelConfig(msgspec.Struct, kw_only=True):
    # "default" (bundled SmolLM2-135M-Instruct) or a local HF directory.
    model: str = "default"
    # "auto": bfloat16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    # None: the model's max_position_embeddings.
    max_model_len: Optional[int] = None
    device: str = "auto"
    # "auto": the Triton kernels on CUDA (16-bit), the torch reference elsewhere.
    attention_backend: str = "auto"
    # Seeds the per-request seeds of requests that give none.
    seed: int = 0
    # "auto": the directory's safetensors; "dummy": random weights of the config's shapes (no
    # weight files needed) — for throughput runs of models too large to ship, like vLLM's.
    load_format: str = "auto"
    # CUDA: run every step eagerly instead of replaying CUDA graphs for decode/verify steps.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model != "", "model", "'default' or a path", self.model)
        _check(self.load_format in ("auto", "dummy"), "load_format", "'auto' or 'dummy'", self.load_format)
        _check(isinstance(self.enforce_eager, bool), "enforce_eager", "True or False", self.enforce_eager)
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
               "one of auto, float32, bfloat16, float16", self.dtype)
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "> 0", self.max_model_len)
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
               "auto, cpu, cuda or cuda:N", self.device)
        # (Which backends exist is the attention floor's registry: Engine checks the name.)
        _check(isinstance(self.attention_backend, str) and self.attention_backend != "", "attention_backend",
               "'auto' or a registered backend's name", self.attention_backend)


class CacheConfig(msgspec.Struct, kw_only=True):
    # Tokens per KV block. the Triton backend's paged kernels need a multiple of 64 on CUDA;
    # "auto" picks 64 on CUDA and 16 on CPU.
    block_size: Union[int, str] = "auto"
    # Fixed number of blocks, or None to size the cache from kv_cache_memory_gb.
    num_blocks: Optional[int] = None
    kv_cache_memory_gb: float = 1.0
    # Automatic prefix caching: full blocks of committed tokens are shared by every request whose
    # tokens (and cache salt) reach them, and kept, evictable, after their requests end.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "True or False",
               self.enable_prefix_caching)
        _check(self.block_size == "auto" or (isinstance(self.block_size, int) and self.block_size > 0),
               "block_size", "'auto' or a positive int", self.block_size)
        _check(self.num_blocks is None or self.num_blocks > 0, "num_blocks", "> 0 or None", self.num_blocks)
        _check(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "> 0", self.kv_cache_memory_gb)


class SchedulerConfig(msgspec.Struct, kw_only=True):
    max_num_seqs: int = 64
    # Token budget of one step (prefill chunks + decode/tree tokens).
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", "> 0", self.max_num_seqs)
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "> 0", self.max_num_batched_tokens)


class SpeculativeConfig(msgspec.Struct, kw_only=True):
    method: str = "medusa"
    # "default" (heads shipped for the bundled model), "random" or a heads directory.
    heads: str = "default"
    # Preset name (see engine.spec.tree.PRESETS) or an explicit list of choice tuples.
    tree: Union[str, list[list[int]]] = "mc_sim_7b_63"
    acceptance: str = "typical"
    # Typical acceptance: accept x if p(x) > min(epsilon, alpha * exp(-H(p))).
    epsilon: float = 0.09
    alpha: float = 0.3
    # Number of heads when heads="random".
    num_heads: int = 4
    # Size the tree every step from the number of decoding sequences and a latency model
    # measured at start-up (down to no speculation); needs heads with measured accuracies.
    backoff: bool = False
    # Size every sequence's tree on its own, each step: the full tree's nodes taken best-first
    # across all decoding sequences by the heads' own probabilities (calibrated online against
    # what served steps accept), as many as the step-latency grid says pay
    # (engine/core/adaptive.py). Exclusive with ``backoff`` (which sizes one tree per step).
    adaptive: bool = False
    # Which tokens the heads may propose: "heads" — the heads' proposal vocabulary when their
    # directory ships one (proposal_vocab.json), else the full vocabulary —, or "full". Output
    # is exact either way; only the candidates (and the proposal's cost) change.
    proposal_vocab: str = "heads"
    # Structured outputs: fit each constrained sequence's tree to its grammar before verifying
    # it (tree nodes the grammar refuses take the tokens a near-forced parent state allows;
    # engine/core/structured.py). Output is exact either way; only acceptance changes.
    grammar_pruning: bool = True

    def __post_init__(self) -> None:
        _check(self.method == "medusa", "speculative.method", "'medusa'", self.method)
        # (Which rules exist is engine.sample.acceptance's registry: Engine checks the name.)
        _check(isinstance(self.acceptance, str) and self.acceptance != "", "speculative.acceptance",
               "a registered rule's name", self.acceptance)
        _check(0 < self.epsilon < 1, "speculative.epsilon", "in (0, 1)", self.epsilon)
        _check(0 < self.alpha <= 1, "speculative.alpha", "in (0, 1]", self.alpha)
        _check(1 <= self.num_heads <= 16, "speculative.num_heads", "in [1, 16]", self.num_heads)
        _check(isinstance(self.adaptive, bool), "speculative.adaptive", "True or False", self.adaptive)
        _check(not (self.adaptive and self.backoff), "speculative.adaptive",
               "False when speculative.backoff is on (adaptive sizes each sequence's tree itself)", self.adaptive)
        _check(isinstance(self.grammar_pruning, bool), "speculative.grammar_pruning", "True or False",
               self.grammar_pruning)
        _check(self.proposal_vocab in ("heads", "full"), "speculative.proposal_vocab", "'heads' or 'full'",
               self.proposal_vocab)


class ParallelConfig(msgspec.Struct, kw_only=True):
    tensor_parallel_size: int = 1
    # "uniproc": the model runs in the engine's process; "ray": one Ray actor per TP rank.
    executor: str = "uniproc"
    # Ray cluster to join: None starts (or reuses) a local Ray, "auto" joins the cluster
    # started on this machine with `ray start`, "ray://host:port" a remote one.
    ray_address: Optional[str] = None
    # A step (or worker start-up) that takes longer fails with an error instead of hanging;
    # also the collectives' timeout, so a dead peer cannot block the survivors for ever.
    worker_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", ">= 1", self.tensor_parallel_size)
        _check(self.executor in ("uniproc", "ray"), "executor", "'uniproc' or 'ray'", self.executor)
        _check(self.executor == "ray" or self.tensor_parallel_size == 1, "tensor_parallel_size",
               "1 with executor='uniproc' (tensor parallelism runs over Ray: executor='ray')",
               self.tensor_parallel_size)
        _check(self.ray_address is None or self.executor == "ray", "ray_address",
               "unset unless executor='ray'", self.ray_address)
        _check(self.worker_timeout_s > 0, "worker_timeout_s", "> 0", self.worker_timeout_s)


class EngineConfig(msgspec.Struct, kw_only=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    speculative: Optional[SpeculativeConfig] = None


_SECTIONS = {
    "model": (ModelConfig, set(ModelConfig.__struct_fields__)),
    "cache": (CacheConfig, set(CacheConfig.__struct_fields__)),
    "scheduler": (SchedulerConfig, set(SchedulerConfig.__struct_fields__)),
    "parallel": (ParallelConfig, set(ParallelConfig.__struct_fields__)),
}


def build_engine_config(model: str = "default", speculative: Any = None, **kwargs: Any) -> EngineConfig:
    """Flat keyword arguments (``Engine(model, block_size=16, max_num_seqs=8)``) → EngineConfig."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    parts["model"]["model"] = model
    for key, value in kwargs.items():
        for name, (_, fields) in _SECTIONS.items():
            if key in fields:
                parts[name][key] = value
                break
        else:
            known = sorted(f for _, fields in _SECTIONS.values() for f in fields)
            raise ValueError(f"unknown engine option {key!r}; known options: {', '.join(known)}")
    spec: Optional[SpeculativeConfig]
    if speculative is None or isinstance(speculative, SpeculativeConfig):
        spec = speculative
    elif isinstance(speculative, dict):
        unknown = set(speculative) - set(SpeculativeConfig.__struct_fields__)
        if unknown:
            raise ValueError(f"speculative: unknown keys {sorted(unknown)}; "
                             f"known: {sorted(SpeculativeConfig.__struct_fields__)}")
        spec = SpeculativeConfig(**speculative)
    else:
        raise ValueError(f"speculative: expected a dict, SpeculativeConfig or None, got {speculative!r}")
    return EngineConfig(
        **{name: _typed(cls, parts[name]) for name, (cls, _) in _SECTIONS.items()}, speculative=spec
    )


def validation_field(text: str) -> Optional[str]:
    """The field a msgspec ValidationError's message is about: the path it is at ("... - at
    `$.messages[0]`"), followed by the field it names when it names one ("missing required
    field `role`", "unknown field `foo`"); None for the value as a whole. (The HTTP server's
    ``param`` of a 400, and the option a config error names.)"""
    path = text.split(" - at `$.", 1)[1].rstrip("`") if " - at `$." in text else ""
    named = None
    for marker in ("required field `", "unknown field `"):
        if marker in text:
            named = text.split(marker, 1)[1].split("`", 1)[0]
    if named is not None:
        return f"{path}.{named}" if path else named
    return path or None


def _typed(cls, values: dict[str, Any]):
    """``cls(**values)`` with every value checked against its field's type first: a wrong type
    (``max_model_len="big"``) is a ValueError naming the field, not a TypeError from a check."""
    try:
        return msgspec.convert(values, cls)
    except msgspec.ValidationError as e:
        text = str(e)
        field = validation_field(text)
        if field is None:
            raise ValueError(text) from None
        message = text.split(" - at `$.", 1)[0]
        if message.startswith("Expected `") and field in values:  # a wrong type: say what was given
            message = f"expected {message.split('`')[1]}, got {values[field]!r}"
        raise ValueError(f"{field}: {message}") from None
