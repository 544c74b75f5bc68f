"""Prompt data for head training and evaluation, and the held-out split.

One prompt in ten (by a hash of its id) is held out: heads are never trained on it, and
benchmarks and evaluation use only held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_PROMPTS = DATA_DIR / "train_prompts.jsonl"
EXTRA_PROMPTS = DATA_DIR / "train_prompts_extra.jsonl"


def is_heldout(prompt_id: str) -> bool:
    return int(hashlib.sha1(prompt_id.encode()).hexdigest(), 16) % 10 == 0


def read_prompts(path: Path, split: str, max_chars: int = 1500) -> Iterator[tuple[str, str]]:
    """(id, prompt) rows of ``split`` ('train' or 'heldout') from a JSONL with a ``prompt`` field
    (``id`` optional: the line number stands in)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{n + 1}: no 'prompt' field")
            pid = str(row.get("id", n))
            if (split == "heldout") == is_heldout(pid) and len(row["prompt"]) <= max_chars:
                yield pid, row["prompt"]
