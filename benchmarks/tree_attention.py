"""The verify step's attention kernel alone: one run over each prefix against split-K.

    python -m benchmarks.tree_attention [--batch-sizes 1 4 16] [--ctx 256 1024 4096]

Times ``engine.kernels.tree_attention.paged_tree_attention`` per call (one layer): ``--calls``
calls captured back to back in a CUDA graph, as a forward runs its layers (eager calls would
time Python's launches), CUDA events, the median of ``--iters`` replays. A tree of ``--tree``
nodes over prefixes of ``--ctx`` tokens in a shuffled paged cache, with ``splits=1`` (every
program walks its whole prefix) and with the splits the kernel picks for the batch
(``default_splits``); prints both and their ratio. Shapes default to the bundled model's (9
query heads over 3 KV heads, head_dim 64); ``--heads 32 --kv-heads 8 --head-dim 128`` is
Llama-3.1-8B's.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import environment, median_call_ms, print_table, write_results
from engine.core.shapes import cdiv
from engine.kernels.tree_attention import default_splits, paged_tree_attention
from engine.spec.tree import MedusaTree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--calls", type=int, default=30, help="kernel calls per graph replay (a forward's layers)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.tree_attention times a CUDA kernel: it needs a GPU")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    tree = MedusaTree.build(args.tree, 4)
    n, page = tree.num_nodes, args.page
    mask = tree.mask.to(dev, torch.int8)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in args.ctx:
        for b in args.batch_sizes:
            pages = cdiv(ctx + n, page)
            tables = torch.randperm(b * pages, generator=gen).view(b, pages).to(dev, torch.int32)
            k_cache = torch.randn(b * pages * page, args.kv_heads, args.head_dim, generator=gen).to(dev, dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(b * n, args.heads, args.head_dim, generator=gen).to(dev, dtype)
            k = torch.randn(b * n, args.kv_heads, args.head_dim, generator=gen).to(dev, dtype)
            v = torch.randn_like(k)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
            auto = default_splits(b, args.heads, args.kv_heads, n, dev)

            def graphed(splits):
                """``--calls`` back-to-back calls in one CUDA graph, as a forward replays them."""
                paged_tree_attention(q, k, v, k_cache, v_cache, tables, lens, mask, page, splits=splits)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(args.calls):
                        paged_tree_attention(q, k, v, k_cache, v_cache, tables, lens, mask, page, splits=splits)
                return g.replay

            one = median_call_ms(graphed(1), args.iters) / args.calls
            split = median_call_ms(graphed(auto), args.iters) / args.calls
            rows.append({"batch_size": b, "ctx": ctx, "nodes": n, "splits": auto, "one_run_us": round(1e3 * one, 1),
                         "split_k_us": round(1e3 * split, 1), "speedup": round(one / split, 2)})
            print(rows[-1], flush=True)
    print_table(rows, ["batch_size", "ctx", "nodes", "splits", "one_run_us", "split_k_us", "speedup"])
    env = {**environment(dev, dtype, f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}"),
           "tree": args.tree, "page": args.page, "iters": args.iters}

    def plot(ax, rows):
        for b in args.batch_sizes:
            r = [x for x in rows if x["batch_size"] == b]
            ax.plot([x["ctx"] for x in r], [x["one_run_us"] for x in r], "o--", label=f"b{b} one run")
            ax.plot([x["ctx"] for x in r], [x["split_k_us"] for x in r], "o-", label=f"b{b} split-K")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("µs per layer")

    print("wrote", write_results("tree-attention", env, rows, plot))


if __name__ == "__main__":
    main()
