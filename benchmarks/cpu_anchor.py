"""The CPU anchor (issue 35): llama.cpp on the very GGUF file the bundled model comes from, next
to this engine's plain and Medusa decoding at batch 1 — the same held-out prompts (one list of
token ids each, the chat template applied once by the engine's tokenizer), greedy, the same
number of new tokens (EOS ignored), tok/s side by side, the configurations interleaved over
``--repeats`` rounds (median kept).

    pip install llama-cpp-python     # a source build (cmake, a C++ compiler): not a dependency
    python benchmarks/cpu_anchor.py --prompts 8 --max-tokens 64 --repeats 3

What it compares is what a CPU user would pick instead, not like for like: llama.cpp computes
with the file's Q4_1 weights (~80 MB, integer dot products), while the engine de-quantises them
once to fp32 and reads 540 MB a step. So its greedy tokens may differ from the engine's (other
weights' arithmetic); the share of prompts whose tokens agree is reported, never required.
Each row: tok/s (new tokens over wall time, prompt processing included), the ratio to the
engine's plain decoding, the engine's tokens per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (decode_counts, environment, eval_prompts, print_table, rotated_rounds,  # noqa: E402
                               tokens_per_step, write_results)
from engine import SamplingParams  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.models.loader import find_default_gguf  # noqa: E402


def engine_run(eng: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, outputs) for the prompts one after another (batch 1)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = [eng.generate_batch([p], params)[0].token_ids for p in prompts]
    return time.perf_counter() - t0, outs


def llama_run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """(seconds, outputs): llama.cpp's greedy decoding (top-k 1, no repetition penalty) of each
    prompt's ids, stopped after ``max_tokens`` new tokens (``generate`` does not stop at EOS)."""
    outs = []
    t0 = time.perf_counter()
    for p in prompts:
        llm.reset()
        got: list[int] = []
        for tok in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(tok)
            if len(got) == max_tokens:
                break
        outs.append(got)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp's threads (the engine's: torch's)")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: `pip install llama-cpp-python` (a source build)")

    gguf = find_default_gguf()
    engines = {"plain": Engine("default"),
               "medusa tree=auto": Engine("default", speculative={"heads": "default", "tree": "auto"}),
               "medusa adaptive": Engine("default", speculative={"heads": "default", "adaptive": True})}
    ids = [engines["plain"].encode(p, chat=True) for p in eval_prompts(args.prompts)]
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)
    runs = {name: (lambda e=e: engine_run(e, ids, args.max_tokens)) for name, e in engines.items()}
    runs["llama.cpp (Q4_1)"] = lambda: llama_run(llm, ids, args.max_tokens)
    for e in engines.values():  # warm-up: one short prompt each
        e.generate_batch([ids[0]], SamplingParams(temperature=0, max_tokens=4))
    llama_run(llm, ids[:1], 4)

    before = {name: decode_counts(e) for name, e in engines.items()}
    seconds, outputs = rotated_rounds(runs, args.repeats)
    tokens = args.prompts * args.max_tokens
    plain_s = statistics.median(seconds["plain"])
    rows = []
    for name, ts in seconds.items():
        s = statistics.median(ts)
        row = {"config": name, "batch_size": 1, "prompts": args.prompts, "max_tokens": args.max_tokens,
               "tok_s": round(tokens / s, 2), "vs_plain": round(plain_s / s, 3),
               "runs_tok_s": [round(tokens / t, 2) for t in ts],
               "agrees_with_plain": sum(a == b for a, b in zip(outputs[name], outputs["plain"]))}
        if name in engines:
            row["tokens_per_step"] = tokens_per_step(engines[name], before[name])
        rows.append(row)
    env = environment(torch.device("cpu"), torch.float32, "SmolLM2-135M-Instruct")
    env.update(gguf=gguf.name, llama_cpp_threads=args.threads, torch_threads=torch.get_num_threads(),
               repeats=args.repeats, prompt_split="heldout")
    print(env)
    print_table(rows, ["config", "tok_s", "vs_plain", "runs_tok_s", "tokens_per_step", "agrees_with_plain"])

    def plot(ax, rows):
        ax.bar([r["config"] for r in rows], [r["tok_s"] for r in rows], label="tok/s, batch 1")
        ax.set_ylabel("new tokens / s")
        ax.tick_params(axis="x", labelsize=7)
    print("wrote", write_results("cpu-anchor", env, rows, plot))


if __name__ == "__main__":
    main()
