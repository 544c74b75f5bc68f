"""A weightless model directory of a large Llama shape, for throughput runs with
``load_format="dummy"`` (random weights drawn on the device; nothing to download or carry).

    python benchmarks/dummy_model.py llama-8b /tmp/llama-8b
    python benchmarks/throughput.py --model /tmp/llama-8b --load-format dummy --tp 1 2 --heads random

The tokenizer is the bundled model's (token ids stay below its 49,152 entries; the model's
vocabulary is the real shape's, so the lm_head costs what it would).

``--heads DIR`` also writes random Medusa heads of that shape, in the layout ``train-heads``
writes, with a proposal vocabulary of ``--proposal-vocab`` ids (0 for none):

    python benchmarks/dummy_model.py llama-8b /tmp/llama-8b --heads /tmp/llama-8b-heads --proposal-vocab 32768
    python -m benchmarks.profile_step --model /tmp/llama-8b --load-format dummy --heads /tmp/llama-8b-heads

The engine's ``heads="random"`` are Medusa-1 heads projecting through the base lm_head over the
whole vocabulary, so their proposal reads the 128,256-row lm_head a second time every step
(~0.37 ms on an H100 at the 8B shape). Heads trained here ship a proposal vocabulary (the
bundled ones: 8,192 of 49,152 ids, 94% of held-out tokens); FR-Spec (Zhao et al., 2025) keeps
32,768 of Llama-3's 128,256 for its drafts. The ids themselves do not matter to a random
model's step cost (the first N are taken); their number does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.models.loader import TOKENIZER_FILES, resolve_model_path  # noqa: E402

SHAPES = {
    # Llama-3.1-8B and -70B shapes (config.json of the published checkpoints).
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8),
}


def write_dummy_model(shape: str, out: Path) -> Path:
    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)}, got {shape!r}")
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    bundled = resolve_model_path("default")
    for f in list(TOKENIZER_FILES) + ["tokenizer_config.json", "special_tokens_map.json"]:
        if (bundled / f).is_file():
            shutil.copy(bundled / f, out / f)
    return out


def write_random_heads(model_dir: Path, out: Path, num_heads: int, num_layers: int, kind: str,
                       proposal_vocab: int, seed: int = 0) -> Path:
    """Random heads (bf16, shared lm_head) for the model in ``model_dir``, saved like trained ones."""
    import torch

    from engine.spec.heads import MedusaHeads
    from engine.spec.proposer import PROPOSAL_VOCAB_FILE

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    if not 0 <= proposal_vocab <= vocab:
        raise ValueError(f"proposal_vocab: expected 0 (none) up to the vocabulary's {vocab}, got {proposal_vocab}")
    heads = MedusaHeads(num_heads, num_layers, hidden, vocab, kind=kind).randomize(seed).to(torch.bfloat16)
    heads.save(out, base_model=f"{model_dir} (random weights)")
    if proposal_vocab:
        (out / PROPOSAL_VOCAB_FILE).write_text(json.dumps(
            {"token_ids": list(range(proposal_vocab)), "source": "the first ids (random heads, random model)"}))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--heads", type=Path, help="also write random heads for the model here")
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    ap.add_argument("--head-kind", default="medusa", help="medusa (Medusa-1), root_conditioned or sequential")
    ap.add_argument("--proposal-vocab", type=int, default=32768, help="proposal vocabulary size (0: none)")
    ap.add_argument("--tree-json", type=Path,
                    help="copy this tree.json (e.g. engine/spec/bundled_heads/tree.json) into the heads: heads "
                         "whose measured accuracy claims what they do not deliver, for back-off (tree=auto, "
                         "backoff=True need one) — the stand-in for heads trained on other traffic")
    args = ap.parse_args()
    print(write_dummy_model(args.shape, args.out))
    if args.heads is not None:
        print(write_random_heads(args.out, args.heads, args.num_heads, args.num_layers, args.head_kind,
                                 args.proposal_vocab))
        if args.tree_json is not None:
            shutil.copy(args.tree_json, args.heads / "tree.json")
    elif args.tree_json is not None:
        ap.error("--tree-json: goes with --heads")
