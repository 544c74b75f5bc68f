"""How good are a set of Medusa heads, on prompts they were not trained on?

Per prompt set (the held-out split of the training prompts, and dev_eval_prompts.jsonl —
GSM8K test and HumanEval, evaluation only): the base model answers greedily; on its answers,
each head's top-1/top-5 (heads that read the tree path read the true one); then, through the
engine, mean accepted tokens per step and the accepted-length histogram with mc_sim_7b_63 and
with the heads' own tree (tree.json), greedy and typical acceptance at T=0.7.

    python -m benchmarks.heads_quality --heads default --num-prompts 64 --max-tokens 128 \
        --prompt-set heldout=../shared/data/train_prompts.jsonl \
        --prompt-set dev_eval=../shared/data/dev_eval_prompts.jsonl

Writes benchmarks/results/heads-quality-*.json + PNG and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_results
from engine.engine import Engine
from engine.training.data import read_prompts
from engine.spec.heads import BUNDLED_HEADS_DIR, MedusaHeads
from engine.training.train import _float_lm_head, distill, measure_acceptance, rank_accuracy, response_hidden_states


def load_prompt_set(spec: str, n: int) -> tuple[str, list[tuple[str, str]]]:
    """NAME=PATH: the held-out split of a training file when NAME is 'heldout', else every row."""
    name, _, path = spec.partition("=")
    if not path:
        raise ValueError(f"--prompt-set: expected NAME=PATH, got {spec!r}")
    if name == "heldout":
        rows = list(read_prompts(Path(path), "heldout", 1500))
    else:
        rows = []
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    r = json.loads(line)
                    if len(r["prompt"]) <= 1500:
                        rows.append((str(r.get("id", i)), r["prompt"]))
    if not rows:
        raise ValueError(f"--prompt-set {spec!r}: no prompts")
    return name, rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--prompt-set", action="append", required=True, help="NAME=PATH (NAME 'heldout': the held-out split)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7, help="for the typical-acceptance rows")
    args = ap.parse_args()
    heads_dir = BUNDLED_HEADS_DIR if args.heads == "default" else Path(args.heads)
    plain = Engine(args.model, max_num_seqs=args.num_prompts, max_num_batched_tokens=max(8192, 4 * args.num_prompts),
                   enforce_eager=True)
    dev = plain.device
    env = {**environment(dev, plain.model.dtype, plain.model_path.name), "heads": str(args.heads)}
    heads = MedusaHeads.load(heads_dir, plain.arch.hidden_size, plain.arch.vocab_size).to(dev).eval()
    lm_head = _float_lm_head(plain.model.lm_head, dev)
    embed_w = plain.model.model.embed_tokens.weight.detach().float()
    tree_json = json.loads((heads_dir / "tree.json").read_text())["choices"]
    rows = []
    for spec in args.prompt_set:
        name, prompt_rows = load_prompt_set(spec, args.num_prompts)
        cache = Path(f"/tmp/heads_quality_{name}_{len(prompt_rows)}_{args.max_tokens}.jsonl")
        examples = distill(plain, prompt_rows, cache, args.max_tokens, 0.0, 0, args.num_prompts)
        data = response_hidden_states(plain.model, examples, dev, heads.num_heads)
        with torch.no_grad():
            acc = rank_accuracy(heads.float(), lm_head, data, dev, embed_w=embed_w)
        base = {"prompt_set": name, "num_prompts": len(prompt_rows), "max_tokens": args.max_tokens,
                "head_top1": [round(a, 4) for a in acc[:, 0].tolist()],
                "head_top5": [round(a, 4) for a in acc[:, :5].sum(1).tolist()]}
        prompts = [p for _, p in prompt_rows]
        for tree_name, tree in (("mc_sim_7b_63", "mc_sim_7b_63"), ("tree.json", tree_json)):
            for acceptance, temp in (("greedy", 0.0), ("typical", args.temperature)):
                m = measure_acceptance(args.model, str(heads_dir), prompts, args.max_tokens, tree=tree,
                                       acceptance=acceptance, temperature=temp, enforce_eager=True)
                rows.append({**base, "tree": tree_name, "acceptance": acceptance, "temperature": temp,
                             "mean_accepted": m["mean_accepted"], "accepted_hist": m["accepted_hist"],
                             "per_head_acceptance": m["per_head_acceptance"], "tree_steps": m["tree_steps"]})
                print(json.dumps(rows[-1]))
    print_table(rows, ["prompt_set", "tree", "acceptance", "temperature", "mean_accepted", "head_top1", "head_top5"])

    def plot(ax, rows):
        for i, r in enumerate(rows):
            hist = r["accepted_hist"]
            total = max(1, sum(hist))
            ax.plot(range(len(hist)), [h / total for h in hist], marker="o",
                    label=f"{r['prompt_set']} {r['tree']} {r['acceptance']} ({r['mean_accepted']:.2f})")
        ax.set_xlabel("accepted candidates in a step")
        ax.set_ylabel("share of decode steps")
        ax.legend(fontsize=6)

    print(f"wrote {write_results('heads-quality', env, rows, plot)}")


if __name__ == "__main__":
    main()
