"""Medusa vs plain decoding in this engine: tokens/s, mean accepted length, per tree and
batch size, greedy, held-out chat prompts; one run side by side.

    python benchmarks/speculative.py --heads random --trees small_12 --batch-sizes 1 4   # CPU
    python benchmarks/speculative.py --heads default --batch-sizes 1 4 16 64             # GPU

The tree name ``backoff`` runs Medusa with back-off (tree sized per step from a latency model
measured at start-up; needs heads with tree.json, e.g. the default heads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, print_table, write_results  # noqa: E402
from benchmarks.throughput import sync  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def run(engine, prompts, max_tokens):
    engine.generate_batch(prompts[:1], SamplingParams(temperature=0, max_tokens=4), chat=True)  # warm-up
    engine.reset_stats()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    sync(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params, chat=True)
    sync(engine.device)
    dt = time.perf_counter() - t0
    return outs, sum(len(o.token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--trees", nargs="+", default=["mc_sim_7b_63", "small_12", "chain:3"])
    ap.add_argument("--acceptance", default="typical")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    kw = dict(dtype=args.dtype, max_num_seqs=max(args.batch_sizes))
    plain = Engine(args.model, **kw)
    env = environment(plain.device, plain.dtype, "SmolLM2-135M-Instruct" if args.model == "default" else args.model)
    env["heads"] = args.heads
    rows = []
    base = {}
    for bs in args.batch_sizes:
        prompts = eval_prompts(bs)
        base[bs] = run(plain, prompts, args.max_tokens)
    del plain
    for tree in args.trees:
        spec = {"heads": args.heads, "tree": tree, "acceptance": args.acceptance}
        if tree == "backoff":
            spec.update(tree="auto", backoff=True)
        eng = Engine(args.model, speculative=spec, **kw)
        for bs in args.batch_sizes:
            prompts = eval_prompts(bs)
            outs, tok_s = run(eng, prompts, args.max_tokens)
            ref_outs, plain_tok_s = base[bs]
            rows.append({**env, "tree": tree, "tree_nodes": eng.tree.num_nodes,
                         "acceptance": args.acceptance, "batch_size": bs,
                         "plain_tok_s": plain_tok_s, "medusa_tok_s": tok_s, "speedup": tok_s / plain_tok_s,
                         "mean_accepted": eng.stats.mean_accepted_length,
                         "per_head_acceptance": [round(x, 3) for x in eng.stats.per_head_acceptance],
                         "steps_by_tree_size": dict(eng.stats.steps_by_tree_size),
                         "greedy_identical": [o.token_ids for o in outs] == [o.token_ids for o in ref_outs]})
            print_table([rows[-1]], ["tree", "batch_size", "plain_tok_s", "medusa_tok_s", "speedup", "mean_accepted"])
        del eng

    def plot(ax, rows):
        bss = sorted({r["batch_size"] for r in rows})
        first = [r for r in rows if r["tree"] == rows[0]["tree"]]
        ax.plot(bss, [r["plain_tok_s"] for r in first], "k--o", label="plain decoding")
        for tree in dict.fromkeys(r["tree"] for r in rows):
            tr = [r for r in rows if r["tree"] == tree]
            ax.plot([r["batch_size"] for r in tr], [r["medusa_tok_s"] for r in tr], "o-", label=f"Medusa {tree}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")

    print(f"\n{env}")
    print_table(rows, ["tree", "tree_nodes", "batch_size", "plain_tok_s", "medusa_tok_s", "speedup",
                       "mean_accepted", "greedy_identical"])
    print("wrote", write_results("speculative", env, rows, plot))


if __name__ == "__main__":
    main()
