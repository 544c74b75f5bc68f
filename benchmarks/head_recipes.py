"""Head-training recipes side by side: one self-distilled data set, several head designs and
losses trained on it, each evaluated on held-out prompts (per-head top-1/top-5, the tree's
expected length, and mean accepted tokens per step through the engine, greedy, with
mc_sim_7b_63 and with the heads' own tree; with and without the proposal vocabulary).

    python -m benchmarks.head_recipes --out DIR --prompts A.jsonl,B.jsonl --train-prompts 8000 \
        --gen-max-tokens 256 --variant medusa:ce:1:1 --variant root_conditioned:kl:1:1

A variant is kind:loss:layers:epochs. Every variant's heads land in DIR/<variant>/, the rows in
DIR/recipes.json (written after each variant, so a run stopped by --time-limit-s keeps what it
measured) and benchmarks/results/head-recipes-*.json + PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import environment, eval_prompts, write_results
from engine.engine import Engine
from engine.training.train import TrainConfig, distill_split, fit_heads, measure_acceptance, response_hidden_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", default=TrainConfig.prompts)
    ap.add_argument("--train-prompts", type=int, default=8000)
    ap.add_argument("--gen-max-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=512)
    ap.add_argument("--batch-rows", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--proposal-vocab-size", type=int, default=8192)
    ap.add_argument("--variant", action="append", required=True, help="kind:loss:layers:epochs")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for accepted length")
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=16.0)
    ap.add_argument("--time-limit-s", type=float, default=1e9, help="skip variants that would start after this")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    base = TrainConfig(out=str(out), prompts=args.prompts, max_train_prompts=args.train_prompts,
                       gen_max_tokens=args.gen_max_tokens, gen_batch=args.gen_batch, batch_rows=args.batch_rows,
                       lr=args.lr, proposal_vocab_size=args.proposal_vocab_size, max_eval_prompts=256)
    engine = Engine(args.model, max_num_seqs=args.gen_batch, max_num_batched_tokens=max(8192, args.gen_batch * 4),
                    kv_cache_memory_gb=args.kv_cache_memory_gb)
    t0 = time.perf_counter()
    train_ex, eval_ex = distill_split(base, engine)
    t_distill = time.perf_counter() - t0
    train_data = response_hidden_states(engine.model, train_ex, engine.device, 4)
    eval_data = response_hidden_states(engine.model, eval_ex, engine.device, 4)
    env = environment(engine.device, engine.model.dtype, str(engine.model_path))
    model_path = str(engine.model_path)
    prompts = eval_prompts(args.eval_prompts)
    rows = []
    print(f"distilled {len(train_ex)} + {len(eval_ex)} prompts in {t_distill:.0f} s; {len(train_data)} training rows")
    for spec in args.variant:
        if time.perf_counter() - t_start > args.time_limit_s:
            print(f"time limit: skipping {spec}")
            continue
        kind, loss, layers, epochs = spec.split(":")
        name = f"{kind}-{loss}-L{layers}-E{epochs}"
        cfg = replace(base, out=str(out / name), head_kind=kind, loss=loss, num_layers=int(layers), epochs=int(epochs))
        report = fit_heads(cfg, engine, train_data, eval_data, train_ex, eval_ex)
        (out / name / "checkpoint.pt").unlink(missing_ok=True)
        row = {"variant": name, "head_kind": kind, "loss": loss, "num_layers": int(layers), "epochs": int(epochs),
               "train_prompts": len(train_ex), "response_tokens": args.gen_max_tokens, "train_rows": len(train_data),
               "train_seconds": report["train_seconds"], "heldout_top1": report["heldout_top1"],
               "heldout_top5": report["heldout_top5"],
               "expected_accept_length_tree_json": report["expected_accept_length_tree_json"],
               "proposal_vocab": report.get("proposal_vocab")}
        tree_json = json.loads((out / name / "tree.json").read_text())["choices"]
        for label, tree, vocab in (("mc_sim_7b_63", "mc_sim_7b_63", "heads"), ("mc_sim_7b_63_full_vocab", "mc_sim_7b_63", "full"),
                                   ("tree_json", tree_json, "heads")):
            m = measure_acceptance(model_path, str(out / name), prompts, args.eval_tokens, tree=tree, acceptance="greedy",
                                   enforce_eager=True, proposal_vocab=vocab)
            row[f"mean_accepted_{label}"] = m["mean_accepted"]
            row[f"tree_steps_{label}"] = m["tree_steps"]
        rows.append(row)
        print(json.dumps(row))
        (out / "recipes.json").write_text(json.dumps({"env": env, "distill_seconds": round(t_distill, 1), "rows": rows},
                                                     indent=1))

    def plot(ax, rows):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["mean_accepted_mc_sim_7b_63"] for r in rows], 0.4, label="mc_sim_7b_63")
        ax.bar([i + 0.2 for i in x], [r["mean_accepted_tree_json"] for r in rows], 0.4, label="heads' tree.json")
        ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=20, fontsize=7)
        ax.set_ylabel("mean accepted tokens / step (greedy, held-out)")
        ax.legend()

    if rows:
        path = write_results("head-recipes", env, rows, plot)
        print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
