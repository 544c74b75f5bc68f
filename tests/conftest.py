import os
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_model

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
# Every test engine measures its back-off latency grid afresh (the on-disk cache is tested on
# its own, in a temporary directory).
os.environ["MEDUSA_ENGINE_REMEASURE"] = "1"

# Varied prompts for end-to-end checks on the bundled model.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "1, 2, 3, 4, 5,",
    "Explain why the sky is blue in one sentence.",
    "Translate 'good morning' into Spanish:",
    "import numpy as np\nx = np.arange(10)\n",
    "List three primary colors:",
    "Once upon a time, in a small village by the mountains,",
]


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from engine.models.loader import resolve_model_path

    return resolve_model_path("default")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama3_tied(tmp_path_factory) -> Path:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), arch="llama", rope_scaling=scaling,
                           tie_word_embeddings=True, num_kv_heads=1, seed=2)


@pytest.fixture(scope="session")
def hf_bundled(bundled_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(bundled_dir), dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def invented_latency_grid(runner, batch_sizes, sizes, block_size, num_blocks, token_budget, tp, ctx=128, plain=True):
    """A stand-in for the start-up latency measurement (engine/worker/startup.py
    ``measure_step_latency``) in tests that set their own back-off policy: the grid's shape,
    invented times — the CPU suite does not spend seconds timing steps nobody reads."""
    return [[b, n, 1.0 + 0.01 * b * (n + 1)] for n in [0] * plain + [s for s in sizes if s > 0]
            for b in batch_sizes if b * (n + 1) <= token_budget]
