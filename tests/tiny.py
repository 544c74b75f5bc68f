"""Tiny random-weight HF model directories for unit tests (config.json, safetensors, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def _word_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))


def make_tiny_model(out: Path, arch: str = "llama", vocab_size: int = 256, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                    max_position_embeddings: int = 512, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                  rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0, rope_scaling=rope_scaling)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=10000.0)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # larger than HF's init so that logits are far from uniform
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = [cls.__name__]
    cfg.save_pretrained(str(out))
    _word_tokenizer(vocab_size, out)
    return out
