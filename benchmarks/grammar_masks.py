"""The driver's cost of structured outputs per step: ``StructuredOutputManager.prepare`` (every
row's grammar mask, the tree fitted to the grammar) for B constrained sequences verifying a
tree, serial and on a thread pool, with no model at all.

Each sequence stands inside a JSON string value (every candidate allowed: nothing to prune,
the most masks) or before a key (most candidates refused: the pruning path).

    python benchmarks/grammar_masks.py --batch-sizes 1 16 64 --threads 1 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_table, write_results  # noqa: E402
from engine.core.outputs import ScheduledSeq  # noqa: E402
from engine.core.sampling_params import SamplingParams, StructuredOutputs  # noqa: E402
from engine.core.structured import GuidanceBackend, StructuredOutputManager  # noqa: E402
from engine.spec.tree import PRESETS, MedusaTree  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "words"],
          "properties": {"title": {"type": "string"}, "words": {"type": "integer"}}}
STATES = {"in_string": ('{"title": "A day in the life of a', " cat"), "before_key": ('{"title": "x", "', "words")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--trees", nargs="+", default=["mc_sim_7b_63", "small_12"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import llguidance.hf
    from transformers import AutoTokenizer

    from engine.models.loader import resolve_model_path

    path = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path)
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
    rows = []
    for tree_name in args.trees:
        tree = MedusaTree(tuple(tuple(c) for c in PRESETS[tree_name]))
        for state, (text, cand) in STATES.items():
            ids = tok.encode(text, add_special_tokens=False)
            c = tok.encode(cand, add_special_tokens=False)[0]
            for b in args.batch_sizes:
                for threads in args.threads:
                    so = StructuredOutputManager(GuidanceBackend(lltok), threads=threads)
                    for i in range(b):
                        so.add(i, StructuredOutputs(json=SCHEMA))
                        so.advance(i, ids)
                    times = []
                    for _ in range(args.iters):
                        seqs = [ScheduledSeq(seq_id=i, token_ids=[ids[-1]], start_pos=0, block_table=[], sample=True,
                                             tree_size=tree.num_nodes - 1, candidates=[c] * (tree.num_nodes - 1),
                                             params=SamplingParams()) for i in range(b)]
                        t0 = time.perf_counter()
                        so.prepare(seqs, lambda s: tree.children)
                        times.append(1e3 * (time.perf_counter() - t0))
                    so.close()
                    rows.append({"tree": tree_name, "nodes": tree.num_nodes, "state": state, "batch": b,
                                 "threads": threads, "ms_per_step": round(statistics.median(times), 3),
                                 "us_per_node": round(1e3 * statistics.median(times) / (b * tree.num_nodes), 2),
                                 "refused_per_seq": so.refused // (args.iters * b)})
                    print_table(rows[-1:], list(rows[-1]))
    import platform

    import torch

    from benchmarks.common import environment

    env = {**environment(torch.device("cpu"), torch.float32, path.name), "host": platform.node(),
           "backend": "llguidance", "iters": args.iters}
    print_table(rows, list(rows[0]))

    def plot(ax, rows_):
        for tree_name in args.trees:
            for threads in args.threads:
                pts = [r for r in rows_ if r["tree"] == tree_name and r["threads"] == threads
                       and r["state"] == "in_string"]
                ax.plot([r["batch"] for r in pts], [r["ms_per_step"] for r in pts], marker="o",
                        label=f"{tree_name}, {threads} thread(s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("constrained sequences")
        ax.set_ylabel("prepare, ms per step")
    print("wrote", write_results("grammar-masks", env, rows, plot))


if __name__ == "__main__":
    main()
