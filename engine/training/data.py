"""Prompt data for head training and evaluation, and the held-out split.

Whole sources are held out (``HELDOUT_SOURCES``): heads are never trained on any prompt of
them, and every speed and acceptance figure is measured on them. A random one-in-ten split of
the same sources, the project's split until issue 29, flattered the heads: on prompts of two
public chat benchmarks that appear in none of the project's files they accepted 2.36 tokens a
step where that split promised 3.18 — prompts of a source the heads trained on share its
phrasing, topics and answer shapes. The held-out sources are chat-style ones of several kinds
(hard user questions, instruction-following, real assistant conversations, complex
instructions), so the held-out set looks like a chat server's traffic, not like the training
mix. ``split="random_heldout"`` keeps the old split (one prompt in ten by a hash of its id,
among the sources that are not held out) for comparison. A JSONL without a ``source`` field
(a user's own prompts) is split by that hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import zip_longest
from pathlib import Path
from typing import Iterator, Optional

# The project's prompt files, in its data directory (``data_dir``).
PROMPT_FILES = ("train_prompts.jsonl", "train_prompts_extra.jsonl")
DATA_DIR_ENV = "MEDUSA_ENGINE_DATA"


# Beside a source checkout (this file is engine/training/data.py in it): the project's data.
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_dir(given: Optional[str] = None) -> Path:
    """The directory of the prompt files: ``given`` (``--data-dir``), else $MEDUSA_ENGINE_DATA,
    else ``../shared/data`` beside a source checkout. ValueError naming the flag when none of
    them is a directory — an installed package carries no data."""
    for where, path in (("--data-dir", given), (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV))):
        if path:
            if not Path(path).is_dir():
                raise ValueError(f"data_dir: {where} = {path!r} is not a directory")
            return Path(path)
    if CHECKOUT_DATA_DIR.is_dir():
        return CHECKOUT_DATA_DIR
    raise ValueError(f"data_dir: no prompt data found; pass --data-dir DIR (a directory holding "
                     f"{' and '.join(PROMPT_FILES)}) or set ${DATA_DIR_ENV}")


def default_prompt_files(given_dir: Optional[str] = None) -> str:
    """The project's prompt files in ``data_dir(given_dir)``, comma-separated (train-heads'
    ``--prompts`` default)."""
    d = data_dir(given_dir)
    return ",".join(str(d / name) for name in PROMPT_FILES if (d / name).exists())

# Repositories (``source`` is "repository:path") none of whose prompts heads are trained on.
# In train_prompts.jsonl: 1,012 + 311 + 421 + 215 = 1,959 of 19,083 prompts.
HELDOUT_SOURCES = (
    "lmarena/arena-hard-auto",  # hard real user questions (Chatbot Arena), v0.1 and v2.0
    "tatsu-lab/alpaca_eval",  # instruction-following evaluation set
    "LAION-AI/Open-Assistant",  # prompts of real assistant conversations
    "nlpxucan/WizardLM",  # complex instructions (WizardLM's test set)
)
SPLITS = ("train", "heldout", "random_heldout")


def is_heldout(prompt_id: str) -> bool:
    """The old random split: one prompt in ten by a hash of its id."""
    return int(hashlib.sha1(prompt_id.encode()).hexdigest(), 16) % 10 == 0


def source_repository(row: dict) -> str:
    """The repository a row came from ("" when the row names no source)."""
    return str(row.get("source", "")).split(":", 1)[0]


def split_of(row: dict, pid: str) -> str:
    """'heldout' for a row of a held-out source (or, with no source, of the hash's tenth),
    'random_heldout' for the hash's tenth of the other sources, else 'train'."""
    repo = source_repository(row)
    if repo in HELDOUT_SOURCES or (not repo and is_heldout(pid)):
        return "heldout"
    return "random_heldout" if repo and is_heldout(pid) else "train"


def read_prompts(path: Path, split: str, max_chars: int = 1500) -> Iterator[tuple[str, str]]:
    """(id, prompt) rows of ``split`` from a JSONL with a ``prompt`` field (``id`` optional:
    the line number stands in; ``source`` optional, see the module doc). ``split``: 'train',
    'heldout' (the held-out sources, interleaved repository by repository so that any first n rows mix
    them) or 'random_heldout' (the old split's tenth of the other sources, never trained on
    either: the old figure, measured beside the new one)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    by_source: dict[str, list[tuple[str, str]]] = {}
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{n + 1}: no 'prompt' field")
            pid = str(row.get("id", n))
            if len(row["prompt"]) > max_chars:
                continue
            if split_of(row, pid) != split:
                continue
            if split == "train":
                yield pid, row["prompt"]
            else:
                by_source.setdefault(source_repository(row), []).append((pid, row["prompt"]))
    for group in zip_longest(*by_source.values()):
        yield from (r for r in group if r is not None)
