"""Where a decode step's time goes: a plain step and a verify step, split into the captured
forward (the model over the step's tokens, attention included), the captured tail (lm_head
over the rows acceptance reads, the greedy decision, the K/V commit, the heads' proposal) and
the host (building the step's inputs, copying results back).

    python -m benchmarks.profile_step --batch-sizes 1 16 64 [--temperature 0.7]
    python benchmarks/dummy_model.py llama-8b /tmp/llama-8b
    python -m benchmarks.profile_step --model /tmp/llama-8b --load-format dummy --heads random

Each row times, with CUDA events (the median call of ``--iters`` rounds), replays of the forward
graph alone, of the decision tail alone, of the proposal alone (steps that propose: a verify
step proposes the next step's candidates, a plain step does not), and the whole
``ModelRunner.execute`` (what a step costs the engine); host = execute - forward - tail. Every
part of every mode at a batch size is called in turn, round after round, so that drift during
the run falls on both sides of a ratio alike. CUDA graphs on a GPU only.

``--ragged K …`` makes the engine's trees adaptive and adds rows of ragged steps (the graph a
step of adaptive trees replays, engine/worker/cuda_graphs.py ``RaggedStep``) in which every
sequence verifies the full tree's first K candidates, beside the uniform full-tree step: a
ragged row at K = the full tree's candidates against the uniform row is what raggedness costs.

``--kernels B …`` also lists, at those batch sizes, the kernels of each replayed graph (torch
profiler, CUDA activity; per step: calls and microseconds by kernel name) — which kernels make
a verify step dearer than a plain one (``…-kernels.txt`` beside the JSON).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import environment, interleaved_median_ms, print_table, write_results
from engine.core.shapes import cdiv, padded_batch
from engine.worker.device_tail import RAGGED_DECISION, RAGGED_PROPOSAL, ProposeAfter, TailKey
from engine.engine import Engine
from engine import SamplingParams
from engine.core.outputs import ScheduledSeq, SchedulerOutput


def kernel_table(fn, iters: int = 20) -> list[tuple[str, float, float]]:
    """(kernel name, calls per call of ``fn``, µs per call of ``fn``), dearest first: the CUDA
    kernels ``fn`` runs (graph replays included: the profiler records each kernel node)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = e.cuda_time_total if us is None else us
        if us > 0:
            out.append((e.key, e.count / iters, us / iters))
    return sorted(out, key=lambda r: -r[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ctx", type=int, default=256, help="context tokens per sequence")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0 adds rows of sampled steps (seeded, the engine's acceptance rule: typical) beside greedy ones")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    ap.add_argument("--ragged", type=int, nargs="*", default=[],
                    help="adaptive trees: also time ragged steps of these candidates per sequence (greedy)")
    ap.add_argument("--kernels", type=int, nargs="*", default=[],
                    help="at these batch sizes also list each graph's kernels (torch profiler)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the graph runner's code uncaptured on the CPU (checks the script, times nothing real)")
    args = ap.parse_args()
    if args.cpu_dry_run:
        import engine.worker.worker

        engine.worker.worker.use_cuda_graphs = lambda *a: True
    elif not torch.cuda.is_available():
        raise SystemExit("profile_step times CUDA graph replays: it needs a GPU (or --cpu-dry-run)")
    spec = {"heads": args.heads, "tree": args.tree, **({"adaptive": True} if args.ragged else {})}
    eng = Engine(args.model, load_format=args.load_format, speculative=spec,
                 max_num_seqs=max(args.batch_sizes), kv_cache_memory_gb=args.kv_cache_memory_gb,
                 max_num_batched_tokens=max(2048, max(args.batch_sizes) * 64))
    runner = eng.executor.worker.runner
    tree = runner.tree
    n = tree.num_nodes - 1
    bs = eng.block_manager.block_size
    table = list(range(cdiv(args.ctx + tree.depth + 1, bs)))
    greedy = SamplingParams(temperature=0)
    sampled = SamplingParams(temperature=args.temperature, seed=0)
    kinds = [("", greedy)] + ([(f" T={args.temperature:g}", sampled)] if args.temperature > 0 else [])
    env = {**environment(runner.device, runner.model.dtype, eng.model_path.name), "heads": args.heads,
           "tree": args.tree, "ctx": args.ctx, "ragged": args.ragged,
           # (adaptive trees: the start-up's latency grid, to hold beside the steps timed here)
           "startup_grid": eng.step_latency}
    if args.ragged:
        print("start-up latency grid [batch, candidates a sequence, ms]:", eng.step_latency, flush=True)
    rows = []
    kernel_report: list[str] = []
    for b in args.batch_sizes:
        modes = []
        ragged = [(f"ragged {k}", k, "", greedy) for k in args.ragged if b * (k + 1) <= eng.config.scheduler.max_num_batched_tokens]
        for mode, cands, suffix, params in [(m, c, k, p) for k, p in kinds for m, c in (("plain", 0), (args.tree, n))] + ragged:
            nodes = list(range(cands)) if mode.startswith("ragged") else []
            seqs = [ScheduledSeq(seq_id=i, token_ids=[1], start_pos=args.ctx, block_table=table, sample=True,
                                 tree_size=cands, candidates=[1] * cands, params=params, seed=i, tree_nodes=nodes)
                    for i in range(b)]
            # A verify step proposes the next step's candidates; a plain step does not.
            out = SchedulerOutput(step_id=-1, seqs=seqs, propose=bool(cands))
            runner.execute(out)
            if nodes:  # the ragged graph of the step's token count, and its two tails
                shape, bucket = runner.graphs.ragged_shape(tree, seqs)
                g = runner.graphs.graphs[(shape, bucket)]
                parts = [("step", lambda out=out: runner.execute(out)), ("forward", g.replay),
                         ("tail (decision)", g.tails[RAGGED_DECISION][0]), ("proposal", g.tails[RAGGED_PROPOSAL][0])]
                modes.append((mode, cands, g, parts))
                continue
            shape = tree if cands else None
            g = runner.graphs.graphs[(shape, padded_batch(b))]  # the graph execute replayed
            # A decision tail is keyed by a TailKey, the proposal after it by ProposeAfter(that
            # key) (engine/worker/device_tail.py): this mode's decision, alone and with its proposal.
            decision = next(k for k in g.tails if isinstance(k, TailKey) and k.tree is shape
                            and k.sampled == (not params.greedy))
            parts = [("step", lambda out=out: runner.execute(out)), ("forward", g.replay),
                     ("tail (decision)", g.tails[decision][0])]
            if out.propose:
                parts.append(("proposal", g.tails[ProposeAfter(decision)][0]))
            modes.append((mode + suffix, cands, g, parts))
        # Every part of every mode in turn, round after round (benchmarks/common.py).
        times = iter(interleaved_median_ms([fn for *_, parts in modes for _, fn in parts], args.iters))
        for mode, cands, g, parts in modes:
            ms = {part: next(times) for part, _ in parts}
            if b in args.kernels and torch.cuda.is_available():
                first = len(kernel_report)
                for part, fn in parts[1:]:
                    kernels = kernel_table(fn)
                    kernel_report.append(f"\n== batch {b}, {mode}, {part}: {sum(r[1] for r in kernels):.0f} kernels, "
                                         f"{sum(r[2] for r in kernels):.1f} us of kernel time")
                    kernel_report += [f"{us:9.1f} us {n:6.1f}x  {name[:110]}" for name, n, us in kernels[:25]]
                print("\n".join(kernel_report[first:]), flush=True)
            step, forward = ms["step"], ms["forward"]
            proposal = ms.get("proposal", 0.0)
            tail = ms["tail (decision)"] + proposal
            rows.append({"model": eng.model_path.name, "batch_size": b, "mode": mode, "nodes": cands + 1,
                         "graph_batch": g.layout.batch, "graph_tokens": getattr(g.layout, "tokens", None), "step_ms": round(step, 3), "forward_ms": round(forward, 3),
                         "tail_ms": round(tail, 3),
                         "proposal_ms": round(proposal, 3),
                         "host_ms": round(step - forward - tail, 3)})
            print(rows[-1])
    for r in rows:
        plain = next(p for p in rows if p["batch_size"] == r["batch_size"] and p["mode"] == "plain")
        if " T=" in r["mode"]:  # sampled rows: also against the greedy row of the same shape
            greedy_row = next(p for p in rows if p["batch_size"] == r["batch_size"]
                              and p["mode"] == r["mode"].split(" T=")[0])
            r["step_vs_greedy"] = round(r["step_ms"] / greedy_row["step_ms"], 2)
        r["step_vs_plain"] = round(r["step_ms"] / plain["step_ms"], 2)
    print_table(rows, ["model", "batch_size", "mode", "step_ms", "step_vs_plain", "step_vs_greedy", "forward_ms",
                       "tail_ms", "proposal_ms", "host_ms"])

    def plot(ax, rows):
        labels = [f"{r['mode'].split(' T=')[0][:9]}{' T' if ' T=' in r['mode'] else ''} b{r['batch_size']}" for r in rows]
        bottom = [0.0] * len(rows)
        for part in ("forward_ms", "tail_ms", "host_ms"):
            vals = [max(0.0, r[part]) for r in rows]
            ax.bar(labels, vals, bottom=bottom, label=part)
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set_ylabel("ms per step")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)

    out = write_results("profile-step", env, rows, plot)
    if kernel_report:
        out.with_name(f"{out.stem}-kernels.txt").write_text("\n".join(kernel_report) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    with torch.inference_mode():  # the graphs' buffers are inference tensors
        main()
