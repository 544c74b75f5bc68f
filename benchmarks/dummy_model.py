"""A weightless model directory of a large Llama shape, for throughput runs with
``load_format="dummy"`` (random weights drawn on the device; nothing to download or carry).

    python benchmarks/dummy_model.py llama-8b /tmp/llama-8b
    python benchmarks/throughput.py --model /tmp/llama-8b --load-format dummy --tp 1 2 --heads random

The tokenizer is the bundled model's (token ids stay below its 49,152 entries; the model's
vocabulary is the real shape's, so the lm_head costs what it would).
"""

from __future__ import annotations

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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(write_dummy_model(sys.argv[1], Path(sys.argv[2])))
