"""The CPU decode step against its memory floor, and Medusa against plain decoding and HF
transformers on a CPU (issue 35): the bundled model, float32 (``--dtype bfloat16``: the opt-in
bf16 mode), greedy, held-out-source prompts.

    python benchmarks/cpu_step.py --prompts 8 --max-tokens 64 --repeats 3 [--dtype bfloat16]

Three tables, one JSON + PNG:
- **floor**: this machine's read bandwidth (a 512 MB tensor summed, median of 5) and the bytes
  a decode step must read (every projection's weight and the lm_head: the model's parameters
  but the embedding rows it looks up), so floor = bytes / bandwidth;
- **steps**: the runner's own steps at ``--ctx`` tokens of context (what tree="auto" and
  back-off time at start-up): plain decoding at batch 1/2/4/8/16 (vs the floor, vs batch 1),
  and one verify step per tree size at batch 1 and 4 (vs plain at that batch), every
  configuration in interleaved rounds (median);
- **end to end**: tok/s of plain decoding, a second plain engine (the A/A row), Medusa with
  tree="auto" and, at batch 1, HF transformers' ``generate`` (fp32, greedy) on the same
  prompts and token counts (EOS ignored), in interleaved repeats (median); greedy outputs
  compared with plain decoding's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (decode_counts, environment, eval_prompts, interleaved_median_ms,  # noqa: E402
                               print_table, rotated_rounds, tokens_per_step, write_results)
from engine import SamplingParams  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.spec.tree import AUTO_TREE_SIZES, build_tree_from_accuracy  # noqa: E402
from engine.worker.startup import decode_step, timing_context  # noqa: E402

PLAIN_BATCHES = (1, 2, 4, 8, 16)
VERIFY_BATCHES = (1, 4)


def read_gbs(mb: int = 512, reps: int = 5) -> float:
    """This machine's read bandwidth in GB/s: a float32 tensor of ``mb`` MB summed (median)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter once, but the token
    embedding, of which it looks up a few rows — unless the lm_head is that matrix (tied)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def step_rows(eng: Engine, ctx: int, iters: int, floor_ms: float) -> list[dict]:
    """Plain steps at PLAIN_BATCHES and verify steps per tree size at VERIFY_BATCHES, timed in
    interleaved rounds through the Medusa engine's runner (plain: no proposal)."""
    worker = eng.executor.worker
    runner, acc = worker.runner, worker.head_accuracy
    trees = {n: build_tree_from_accuracy(acc, n) for n in AUTO_TREE_SIZES}
    kv = runner.kv_cache
    ctx, table = timing_context(max(t.depth for t in trees.values()), ctx, kv.block_size, kv.num_blocks)
    chosen = dict(runner.trees)  # the engine's own tree set, put back after the timings
    configs = [(b, 0) for b in PLAIN_BATCHES] + [(b, n) for b in VERIFY_BATCHES for n in AUTO_TREE_SIZES]

    def fn(b: int, n: int):
        step = decode_step(b, n, ctx, table)

        def run():
            if n:  # each tree alone, so its step proposes for that tree only (as tree="auto" times it)
                runner.set_trees({n: trees[n]})
            runner.execute(step)
        return run

    ms = dict(zip(configs, interleaved_median_ms([fn(b, n) for b, n in configs], iters)))
    runner.set_trees(chosen)
    rows = []
    for (b, n), t in ms.items():
        row = {"table": "steps", "batch_size": b, "candidates": n, "ctx": ctx, "ms": round(t, 2),
               "vs_plain": round(t / ms[(b, 0)], 3)}
        if n == 0:
            row.update(vs_floor=round(t / floor_ms, 3), vs_batch1=round(t / ms[(1, 0)], 3))
        rows.append(row)
    return rows


def hf_run(model, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """HF transformers' greedy ``generate``, one prompt at a time, exactly ``max_tokens`` new tokens."""
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return time.perf_counter() - t0, outs


def engine_run(eng: Engine, prompts: list[list[int]], batch: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += [o.token_ids for o in eng.generate_batch(prompts[i:i + batch], params)]
    return time.perf_counter() - t0, outs


def end_to_end_rows(engines: dict[str, Engine], hf, prompts: list[list[int]], max_tokens: int,
                    repeats: int) -> list[dict]:
    rows = []
    for batch in VERIFY_BATCHES:
        runs = {name: (lambda e=e, b=batch: engine_run(e, prompts, b, max_tokens)) for name, e in engines.items()}
        if batch == 1 and hf is not None:
            runs["HF transformers generate"] = lambda: hf_run(hf, prompts, max_tokens)
        before = {name: decode_counts(e) for name, e in engines.items()}
        seconds, outputs = rotated_rounds(runs, repeats)
        tokens = len(prompts) * max_tokens
        plain_s = statistics.median(seconds["plain"])
        hf_s = statistics.median(seconds["HF transformers generate"]) if "HF transformers generate" in seconds else None
        for name, ts in seconds.items():
            s = statistics.median(ts)
            row = {"table": "end to end", "config": name, "batch_size": batch, "prompts": len(prompts),
                   "max_tokens": max_tokens, "tok_s": round(tokens / s, 2), "vs_plain": round(plain_s / s, 3),
                   "runs_tok_s": [round(tokens / t, 2) for t in ts],
                   "identical_to_plain": sum(a == b for a, b in zip(outputs[name], outputs["plain"]))}
            if hf_s is not None:
                row["vs_hf"] = round(hf_s / s, 3)
            if name in engines:
                row["tokens_per_step"] = tokens_per_step(engines[name], before[name])
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="held-out-source prompts (a multiple of 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the end-to-end runs")
    ap.add_argument("--iters", type=int, default=7, help="interleaved rounds of the step timings")
    ap.add_argument("--ctx", type=int, default=128, help="tokens of context of the timed steps")
    ap.add_argument("--no-hf", action="store_true", help="leave HF transformers' generate out")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the engines' dtype (bfloat16: the opt-in CPU mode; HF's generate stays float32)")
    args = ap.parse_args()
    if args.prompts % 4:
        raise SystemExit("--prompts: a multiple of 4 (the end-to-end runs at batch 4)")

    gbs = read_gbs()
    engines = {"plain": Engine("default", dtype=args.dtype, device="cpu"),
               "plain (A/A)": Engine("default", dtype=args.dtype, device="cpu"),
               "medusa tree=auto": Engine("default", dtype=args.dtype, device="cpu",
                                          speculative={"heads": "default", "tree": "auto"})}
    medusa = engines["medusa tree=auto"]
    nbytes = step_bytes(medusa.model)
    floor_ms = nbytes / gbs / 1e6
    rows = [{"table": "floor", "read_gb_s": round(gbs, 2), "step_weight_mb": round(nbytes / 1e6, 1),
             "floor_ms": round(floor_ms, 2)}]
    rows += step_rows(medusa, args.ctx, args.iters, floor_ms)
    tree = medusa.tree
    prompts = [medusa.encode(p, chat=True) for p in eval_prompts(args.prompts)]
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(medusa.model_path), dtype=torch.float32).eval()
    for e in engines.values():  # warm-up: one short prompt each
        e.generate_batch([prompts[0]], SamplingParams(temperature=0, max_tokens=4))
    rows += end_to_end_rows(engines, hf, prompts, args.max_tokens, args.repeats)

    env = environment(torch.device("cpu"), getattr(torch, args.dtype), "SmolLM2-135M-Instruct")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    env.update(torch_threads=torch.get_num_threads(), prompt_split="heldout", repeats=args.repeats,
               step_iters=args.iters, capture_steps=0, tree_auto_candidates=tree.num_nodes - 1,
               isa=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags])
    print(env)
    print_table([r for r in rows if r["table"] == "floor"], ["read_gb_s", "step_weight_mb", "floor_ms"])
    print_table([r for r in rows if r["table"] == "steps"],
                ["batch_size", "candidates", "ms", "vs_plain", "vs_floor", "vs_batch1"])
    print_table([r for r in rows if r["table"] == "end to end"],
                ["batch_size", "config", "tok_s", "vs_plain", "vs_hf", "tokens_per_step", "identical_to_plain",
                 "runs_tok_s"])

    def plot(ax, rows):
        for b in VERIFY_BATCHES:
            pts = [r for r in rows if r["table"] == "steps" and r["batch_size"] == b]
            ax.plot([r["candidates"] for r in pts], [r["ms"] for r in pts], "o-", label=f"verify step, batch {b}")
        ax.axhline(floor_ms, color="k", ls=":", label=f"memory floor ({floor_ms:.1f} ms)")
        ax.set_xscale("symlog", base=2)
        ax.set_xlabel("tree candidates per sequence (0: plain decoding)")
        ax.set_ylabel("step ms")
    print("wrote", write_results("cpu-step", env, rows, plot))


if __name__ == "__main__":
    main()
