"""Where an engine's wall time goes, step by step: every engine step of a timed run, by kind.

    python -m benchmarks.step_trace --batch-size 64 --trees none backoff mc_sim_7b_63

Runs each configuration on the same held-out prompts (warm-up on the very batch first, as
benchmarks/speculative.py does), times every ``Engine.step`` with the device synchronised, and
groups the steps by kind: prefill-only, mixed (prefill chunks + decoding sequences), decode
(plain or the verified tree size). Prints per kind the step count, total and mean ms, and the
slowest steps; writes the rows to ``benchmarks/results/step-trace-*.json`` and every step
(its kind, sequences, tokens, schedule / execute / wall / GC milliseconds, whether it captured
a graph) to ``…-steps.json`` beside it. It answers "why does this engine spend N ms per step
here" before anyone guesses.

``--host-profile`` also runs the steps that are not pure decodes (prefill, mixed: eager, so
bound by the host) under cProfile and prints their top Python functions per configuration
(``…-host-<config>.txt`` beside the JSON): where an eager step's milliseconds go.
``--host-profile decode`` profiles the pure decode steps instead, from the scheduler's output
to the step's outputs (execution, applying the tokens, the output processor): where a graphed
step's host time goes. ``--startup-profile N`` profiles each engine's start-up (graphs, latency
grid) and prints its top N functions: where its seconds go.

``--trees adaptive`` (adaptive trees) also records every plan's reasoning: per step the
sequences, the nodes chosen, the expected extra tokens and, for the first three plans and every
32nd, per budget the expected tokens per ms against plain decoding's (valuing every node costs
those steps milliseconds at batch 64) — why a step of B sequences verified M nodes, or none —
with the latency grid, its learned corrections and the calibration at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, gc_pauses, print_table, write_results  # noqa: E402
from benchmarks.throughput import sync  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine import SamplingParams  # noqa: E402


def step_kind(out) -> str:
    prefill = sum(len(s.token_ids) for s in out.seqs if len(s.token_ids) > 1)
    decoding = [s for s in out.seqs if len(s.token_ids) == 1]
    trees = sorted({s.tree_size for s in decoding})
    if not decoding:
        return "prefill"
    if any(s.tree_nodes for s in decoding):  # adaptive trees: every sequence its own
        kind = "decode ragged"
    else:
        kind = "decode" + "/".join(f"[{t}]" for t in trees)
    return f"mixed {kind}" if prefill else kind


def trace(engine: Engine, prompts: list[str], max_tokens: int, batch_size: int,
          host_profile: Optional[cProfile.Profile] = None, temperature: float = 0.0,
          profile_kind: str = "eager", queued: bool = False) -> list[dict]:
    """``prompts`` in rounds of ``batch_size`` (after a warm-up on them), or ``queued`` all at
    once (the engine, built with ``max_num_seqs=batch_size``, admits the next as one finishes:
    steady load): a row per engine step.
    ``host_profile``: profiles the execution of every step that is not a pure decode
    (``profile_kind`` "eager"), or every pure decode step from its execution to the step's end
    ("decode")."""
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0 if temperature else None)
    rounds = [prompts] if queued else [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for r in rounds:
        engine.generate_batch(r, params, chat=True)
    steps: list[dict] = []
    execute = engine.executor.execute

    def timed_execute(out, *args, **kwargs):
        kind = step_kind(out)
        profile = host_profile if profile_kind == "eager" and not kind.startswith("decode") else None
        if host_profile is not None and profile_kind == "decode" and kind.startswith("decode"):
            host_profile.enable()  # disabled after the step (below)
        sync(engine.device)
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        # No sync after it: a step that defers its candidates returns once its tokens are back,
        # while the device still proposes (the proposal's time lands in the step's wall time).
        result = execute(out, *args, **kwargs)
        if profile is not None:
            profile.disable()
        steps.append({"kind": kind, "seqs": len(out.seqs), "propose": out.propose,
                      "tokens": sum(len(s.token_ids) + s.tree_size for s in out.seqs),
                      "produced": sum(len(r.sampled_token_ids) for r in result.results),
                      "captured": result.captured,
                      "schedule_ms": 1e3 * (t0 - scheduled_at[0]),
                      "execute_ms": 1e3 * (time.perf_counter() - t0)})
        return result

    schedule = engine.scheduler.schedule
    scheduled_at = [0.0]

    def timed_schedule():
        scheduled_at[0] = time.perf_counter()
        return schedule()

    engine.executor.execute = timed_execute
    engine.scheduler.schedule = timed_schedule
    try:
        with gc_pauses() as gc_time:
            for r in rounds:
                for p in r:
                    engine.add_request(p, params, chat=True)
                while engine.has_unfinished():
                    sync(engine.device)
                    t0, gc0 = time.perf_counter(), gc_time["ms"]
                    engine.step()
                    if host_profile is not None and profile_kind == "decode":
                        host_profile.disable()
                    sync(engine.device)
                    if steps and "step_ms" not in steps[-1]:
                        steps[-1]["step_ms"] = 1e3 * (time.perf_counter() - t0)
                        steps[-1]["gc_ms"] = gc_time["ms"] - gc0  # collections inside the step
    finally:
        engine.executor.execute = execute
        engine.scheduler.schedule = schedule
    return steps


RATES_EVERY = 32  # plans between two that also price every budget (the first three always do)


def trace_plans(engine: Engine) -> Optional[list[dict]]:
    """With adaptive trees: a row per plan the scheduler asks for (sequences, nodes chosen, the
    expected extra tokens; for the first three and every ``RATES_EVERY``-th also per budget the
    expected tokens per ms) — why a step of B sequences verified M nodes, or none."""
    adaptive = engine.policy.adaptive if engine.policy is not None else None
    if adaptive is None:
        return None
    plans: list[dict] = []
    plan = adaptive.plan

    def traced(seqs, num_decoding, max_nodes, route="host"):
        chosen = plan(seqs, num_decoding, max_nodes, route)
        b = num_decoding
        row = {"seqs": b, "with_candidates": len(seqs), "route": route,
               "nodes": sum(len(v) for v in chosen.values()), "expected": round(chosen.expected, 2),
               "plain_rate": round(b / adaptive.latency.ms(b, 0, route), 2)}
        if len(plans) < 3 or len(plans) % RATES_EVERY == 0:
            # Every budget's promise values every node in Python (milliseconds at batch 64,
            # inside the step's time, which the policy learns from): only now and then.
            values = sorted((v for s in seqs if len(s.confidence) == len(adaptive.depths)
                             for v in adaptive.values(s.confidence)), reverse=True)
            row["rates"] = {m: round((b + sum(values[:m])) / adaptive.step_ms(b, m, route), 2)
                            for m in adaptive.budgets(b, max_nodes)}
        plans.append(row)
        return chosen

    adaptive.plan = traced
    return plans


def report_plans(engine: Engine, plans: list[dict], batch_size: int) -> None:
    adaptive = engine.policy.adaptive
    print("adaptive: latency grid [batch, candidates, ms]:", engine.step_latency)
    print(f"adaptive: the driver's own cost per verified node: {1e3 * adaptive.driver_ms_per_node:.2f} us")
    print("adaptive: corrections learned (observed / measured) by (tree size, route, bucket):",
          {k: round(v, 2) for k, v in adaptive.latency.correction.items()})
    print("adaptive: calibration ratio (delivered / promised) by depth, per probability bin:",
          [[round(r, 2) for r in row] for row in adaptive.calibration._ratio])
    full = [p for p in plans if p["seqs"] == batch_size]
    chose = [p for p in full if p["nodes"]]
    print(f"adaptive: {len(plans)} plans, {len(full)} at batch {batch_size}, {len(chose)} of them with trees "
          f"(mean nodes {sum(p['nodes'] for p in chose) / max(1, len(chose)):.1f})")
    priced = [p for p in full if "rates" in p]
    for p in priced[:3] + priced[3:][-3:]:
        print("  plan:", p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--trees", nargs="+", default=["none", "backoff", "mc_sim_7b_63"],
                    help="'none': an engine without speculation; 'backoff': tree auto + back-off")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="prompts in all, run in rounds of --batch-size (default: one round)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    ap.add_argument("--slowest", type=int, default=8, help="list this many slowest steps per config")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="> 0: seeded sampled requests (the engine's acceptance rule: typical)")
    ap.add_argument("--host-profile", nargs="?", const="eager", choices=["eager", "decode"],
                    help="cProfile the steps that are not pure decodes ('eager', the default), or the pure decode "
                         "steps ('decode'); print their top functions")
    ap.add_argument("--queue", action="store_true",
                    help="queue all --num-prompts at once: at most --batch-size in flight, a finished request's "
                         "place taken by the next (steady load; benchmarks/speculative.py --queue)")
    ap.add_argument("--startup-profile", type=int, default=0, metavar="N",
                    help="cProfile each engine's start-up (graph capture, latency grid) and print its top N functions "
                         "(the latency grid is then measured under the profiler: its host share is slower, and so "
                         "are the policy's first choices; trace the plans without it)")
    args = ap.parse_args()

    prompts = eval_prompts(max(args.num_prompts, args.batch_size))
    rows, env = [], None
    host_reports: dict[str, str] = {}
    step_rows: dict[str, list[dict]] = {}  # every step of each configuration, in order
    plan_rows: dict[str, list[dict]] = {}  # adaptive trees: every plan of each configuration
    for tree in args.trees:
        kw = dict(max_num_seqs=args.batch_size, kv_cache_memory_gb=args.kv_cache_memory_gb)
        if tree != "none":
            spec = {"heads": args.heads, "tree": tree}
            if tree == "backoff":
                spec.update(tree="auto", backoff=True)
            if tree == "adaptive" or tree.startswith("adaptive:"):
                spec.update(tree=tree.partition(":")[2] or "auto", adaptive=True)
            kw["speculative"] = spec
        startup = cProfile.Profile() if args.startup_profile else None
        if startup is not None:
            startup.enable()
        engine = Engine(args.model, **kw)
        if startup is not None:
            startup.disable()
            text = io.StringIO()
            pstats.Stats(startup, stream=text).sort_stats("cumulative").print_stats(args.startup_profile)
            pstats.Stats(startup, stream=text).sort_stats("tottime").print_stats(args.startup_profile)
            host_reports[f"{tree}-startup"] = text.getvalue()
            print(f"-- {tree}: start-up profile\n{text.getvalue()}")
        plans = trace_plans(engine)
        env = env or environment(engine.device, engine.dtype, "SmolLM2-135M-Instruct" if args.model == "default"
                                 else args.model)
        profile = cProfile.Profile() if args.host_profile else None
        steps = trace(engine, prompts, args.max_tokens, args.batch_size, profile, args.temperature,
                      args.host_profile or "eager", args.queue)
        if profile is not None:
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
            host_reports[tree] = text.getvalue()
            what = "pure decode" if args.host_profile == "decode" else "prefill and mixed"
            print(f"-- {tree}: host profile of the {what} steps\n{host_reports[tree]}")
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for s in steps:
            by_kind[s["kind"]].append(s)
        total = sum(s["step_ms"] for s in steps)
        print(f"\n== {tree}: {len(steps)} steps, {total:.1f} ms ({len(prompts)} prompts, batch {args.batch_size})",
              flush=True)
        table = []
        for kind, ss in sorted(by_kind.items(), key=lambda kv: -sum(s["step_ms"] for s in kv[1])):
            row = {"config": tree, "temperature": args.temperature, "batch_size": args.batch_size,
                   "num_prompts": len(prompts), "queued": args.queue, "kind": kind,
                   "steps": len(ss),
                   "total_ms": sum(s["step_ms"] for s in ss), "mean_ms": sum(s["step_ms"] for s in ss) / len(ss),
                   "mean_execute_ms": sum(s["execute_ms"] for s in ss) / len(ss),
                   "mean_schedule_ms": sum(s["schedule_ms"] for s in ss) / len(ss),
                   "gc_ms": sum(s["gc_ms"] for s in ss),
                   "tokens_per_ms": sum(s["produced"] for s in ss) / sum(s["step_ms"] for s in ss),
                   "max_ms": max(s["step_ms"] for s in ss), "run_total_ms": total}
            table.append(row)
        rows += table
        print_table(table, ["kind", "steps", "total_ms", "mean_ms", "mean_schedule_ms", "mean_execute_ms", "max_ms",
                           "gc_ms", "tokens_per_ms"])
        step_rows[tree] = steps
        if engine.backoff is not None:
            print("back-off latency grid [batch, candidates, ms]:", engine.step_latency)
            print("back-off acceptance scale (delivered / promised extra tokens) by (decision route, batch bucket):",
                  {k: round(v, 3) for k, v in engine.backoff.calibration.learned().items()})
            print("back-off corrections learned (observed / measured) by (tree size, path):",
                  {k: round(v, 2) for k, v in engine.backoff.latency.correction.items()})
            for path in ("greedy", "sampled"):
                print(f"back-off predicted tokens/s at batch {args.batch_size}, {path} path, by tree size:",
                      {n: round(engine.backoff.rate(args.batch_size, n, path)) for n in engine.backoff.latency.sizes})
        if plans is not None:
            report_plans(engine, plans, args.batch_size)
            plan_rows[tree] = plans
        for s in sorted(steps, key=lambda s: -s["step_ms"])[:args.slowest]:
            print("  slow:", {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()})
        engine.shutdown()

    def plot(ax, rows):
        configs = list(dict.fromkeys(r["config"] for r in rows))
        kinds = list(dict.fromkeys(r["kind"].split(" [")[0].split("[")[0] for r in rows))
        bottom = [0.0] * len(configs)
        for kind in kinds:
            vals = [sum(r["total_ms"] for r in rows if r["config"] == c and r["kind"].startswith(kind))
                    for c in configs]
            ax.bar(configs, vals, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms per run")
        ax.set_title(f"engine time by step kind, batch {args.batch_size}, {env['device']}")
        ax.legend()

    out = write_results("step-trace", env, rows, plot)
    out.with_name(f"{out.stem}-steps.json").write_text(json.dumps(step_rows))
    if plan_rows:
        out.with_name(f"{out.stem}-plans.json").write_text(json.dumps(plan_rows, default=str))
    for tree, text in host_reports.items():
        out.with_name(f"{out.stem}-host-{args.host_profile or 'run'}-{tree}.txt").write_text(text)


if __name__ == "__main__":
    main()
