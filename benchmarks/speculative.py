"""Medusa vs plain decoding in this engine: tokens/s, mean accepted length, per tree and
batch size, greedy, held-out chat prompts; one run side by side.

    python benchmarks/speculative.py --heads random --trees small_12 --batch-sizes 1 4   # CPU
    python benchmarks/speculative.py --heads default --batch-sizes 1 4 16 64             # GPU

The tree name ``backoff`` runs Medusa with back-off (tree sized per step from a latency model
measured at start-up; needs heads with tree.json, e.g. the default heads); ``adaptive`` with
adaptive trees (each sequence's tree sized by its heads' calibrated confidence under a budget
from the same latency model, engine/core/adaptive.py), cut from the heads' tree
(``adaptive:<tree>``: from that tree, e.g. for random heads); ``none`` a second
engine without speculation, timed like the others against the first: its row is the run's
noise floor (an A/A comparison); ``<tree>:sync`` (e.g. ``backoff:sync``) the same engine with
every step waiting for its proposals before returning its tokens (the overlap's A/B). ``--hf`` adds HF
transformers ``generate`` and ``--eager`` plain decoding without CUDA graphs to every row, so
one run holds the whole comparison (GPU: benchmarks/gpu_suite.sh). Batches smaller than
``--min-prompts`` run that many prompts in successive rounds (acceptance varies by prompt).

``--queue K`` changes what a batch size means. By default a batch of B prompts is static: it
runs to completion together, so its slowest sequence ends the run. Speculation spreads the
sequences' finishing times (each accepts at its own rate), and the batch thins to a few
stragglers that run at a small batch's cost while plain decoding's sequences all finish at
the same step — at batch 64 on an H100 back-off's 8-candidate steps made 1.56x plain
decoding's tokens per ms while ~57 sequences ran, and a 60 ms tail of ~4.5 sequences followed
(benchmarks/step_trace.py). With ``--queue K``, K x B prompts go through at most B in flight,
each finished request's place taken by the next prompt at once: the steady load a server
sees at concurrency B, which is where large batches come from.

``--process-per-engine`` builds each configuration's engine in a process of its own (built
one after another, so that no start-up measurement shares the device); the timed runs still
alternate between them, one at a time. It rules out one engine slowing another through the
process they share. Measured on an H100 it did not narrow the A/A row at batch 16–128
(benchmarks/RESULTS.md, 2026-11-24).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, gc_pauses, print_table, write_results  # noqa: E402
from benchmarks.throughput import sync  # noqa: E402
from engine.core.shapes import cdiv  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine import SamplingParams  # noqa: E402


def _rounds(prompts, batch_size):
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]


def _params(max_tokens, temperature):
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0 if temperature else None)


def _chat(engine) -> bool:
    """Prompts go through the chat template, where the tokenizer has one (a dummy model's may not)."""
    return getattr(engine.tokenizer, "chat_template", None) is not None


def _generate(engine, prompts, max_tokens, batch_size, temperature, queued):
    """Outputs in prompt order: in rounds of ``batch_size`` (each a static batch, ended by its
    slowest sequence), or ``queued``: at most ``batch_size`` requests in flight, a finished
    request's place taken by the next prompt at once (a server under steady load)."""
    params = _params(max_tokens, temperature)
    if not queued:
        return [o for r in _rounds(prompts, batch_size) for o in engine.generate_batch(r, params, chat=_chat(engine))]
    waiting, order, done = iter(prompts), [], {}

    def submit() -> None:
        prompt = next(waiting, None)
        if prompt is not None:
            order.append(engine.add_request(prompt, params, chat=_chat(engine)))
    for _ in range(batch_size):
        submit()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
                submit()
    return [done[r] for r in order]


def warm_up(engine, prompts, max_tokens, batch_size, temperature=0.0, queued=False):
    """One pass over the very batches before the timed ones (caches warm, back-off's first
    lessons learned). Nothing is captured here: every CUDA graph was captured at start-up, and
    each timed run reports its capture steps (must be 0) and graph-miss steps."""
    _generate(engine, prompts, max_tokens, batch_size, temperature, queued)


def timed(engine, prompts, max_tokens, batch_size, temperature=0.0, queued=False) -> dict:
    """Generate ``prompts`` in rounds of ``batch_size`` (several rounds at small batch sizes, so
    one prompt's acceptance does not decide the row), or ``queued`` (``_generate``): outputs,
    tokens/s, ms per engine step and per decode-only step, and the engine's speculation
    counters for this run."""
    engine.reset_stats()
    sync(engine.device)
    with gc_pauses() as gc_time:
        t0 = time.perf_counter()
        outs = _generate(engine, prompts, max_tokens, batch_size, temperature, queued)
        sync(engine.device)
        dt = time.perf_counter() - t0
    st = engine.stats
    return {"tokens": [list(o.token_ids) for o in outs], "tok_s": sum(len(o.token_ids) for o in outs) / dt,
            # What else ran inside the timed run: garbage collection, first-use graph captures.
            "gc_ms": round(gc_time["ms"], 1), "capture_steps": st.num_capture_steps,
            "graph_miss_steps": st.num_graph_miss_steps,
            "step_ms": 1e3 * dt / max(1, st.num_steps), "decode_ms": st.decode_step_ms,
            "mean_accepted": st.mean_accepted_length, "mean_verified": st.mean_verified_candidates,
            "per_head_acceptance": [round(x, 3) for x in st.per_head_acceptance],
            "steps_by_tree_size": dict(st.steps_by_tree_size)}


def run(engine, prompts, max_tokens, batch_size, temperature=0.0):
    """Warm-up, then one timed pass: (outputs, tokens/s, ms per engine step, ms per decode step)."""
    warm_up(engine, prompts, max_tokens, batch_size, temperature)
    r = timed(engine, prompts, max_tokens, batch_size, temperature)
    return r["tokens"], r["tok_s"], r["step_ms"], r["decode_ms"]


# A tree name with this suffix ("backoff:sync"): the same engine, but every step waits for its
# proposals before returning its tokens (engine/worker/model_runner.py ``defer_candidates`` off) — the
# A/B of the overlap of the proposal with the host's work, in one run.
SYNC = ":sync"


def _without_deferral(execute):
    return lambda out, defer_candidates=False: execute(out)


def engine_info(eng: Engine) -> dict:
    """What the run's rows and environment read of an engine (plain values: they cross processes)."""
    return {"tree_nodes": eng.tree.num_nodes if eng.tree is not None else 1, "step_latency": eng.step_latency,
            "device": str(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
            "num_graphs": eng.num_graphs, "graph_capture_s": eng.graph_capture_s,
            "graph_memory_gb": eng.graph_memory_gb, "startup_s": round(eng.startup_s, 1)}


def _serve_engine(conn, model: str, kw: dict, gc_freeze: bool) -> None:
    """A child process holding one engine: answers ("warm_up" | "timed", args) with what the
    function of that name returns, ("stop", ()) ends it."""
    if not gc_freeze:
        _no_gc_freeze()
    try:
        eng = Engine(model, **kw)
        conn.send(engine_info(eng))
    except Exception as e:  # the parent reports it and stops the run
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            eng.shutdown()
            conn.send(None)
            return
        conn.send({"warm_up": warm_up, "timed": timed}[cmd](eng, *args))


class EngineProcess:
    """An engine in a process of its own, driven like the in-process one by ``warm_up`` /
    ``timed`` (see ``_serve_engine``)."""

    def __init__(self, model: str, kw: dict, gc_freeze: bool) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_engine, args=(child, model, kw, gc_freeze), daemon=True)
        self.proc.start()
        self.info = self.conn.recv()
        if "error" in self.info:
            raise RuntimeError(f"engine process for {kw.get('speculative')}: {self.info['error']}")
        self.step_latency = self.info["step_latency"]

    def call(self, cmd: str, *args):
        self.conn.send((cmd, args))
        return self.conn.recv()

    def shutdown(self) -> None:
        if self.proc.is_alive():
            self.call("stop")
            self.proc.join(timeout=60)


def _no_gc_freeze() -> None:
    import engine.engine
    import engine.worker.worker

    engine.worker.worker.freeze_heap = engine.engine.freeze_heap = lambda device: None


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (benchmarks/dummy_model.py)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "random_heldout"],
                    help="heldout: prompts of sources the heads never trained on (engine/training/data.py); "
                         "random_heldout: the old one-in-ten split of the trained sources, for comparison")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--trees", nargs="+", default=["mc_sim_7b_63", "small_12", "chain:3"])
    ap.add_argument("--acceptance", default="typical", help="the rule for sampled requests (temperature > 0)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0],
                    help="0: greedy (Medusa must match plain token for token); > 0: sampled, --acceptance decides")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--min-prompts", type=int, default=8,
                    help="smaller batches run this many prompts in successive rounds")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0,
                    help="GPU: enough for the largest batch, or preemption (recompute) is what gets timed")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers generate (plain, greedy)")
    ap.add_argument("--eager", action="store_true", help="also time plain decoding without CUDA graphs")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per configuration and cell, alternating between configurations; the median")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="A/B: leave the collector's heap unfrozen after start-up (engine/worker/worker.py freeze_heap)")
    ap.add_argument("--process-per-engine", action="store_true",
                    help="each configuration's engine in a process of its own (module doc)")
    ap.add_argument("--queue", type=int, default=0, metavar="K",
                    help="0: each batch is static (run to completion together: its slowest sequence ends it); "
                         "K: K x batch-size prompts with at most batch-size in flight, a finished request's "
                         "place refilled at once (steady load, as a server sees it; module doc)")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="keep prefix caching on: the repeated runs then find their prompts cached (off by default, "
                         "so every run prefills as fresh traffic does; benchmarks/multi_turn.py measures caching)")
    args = ap.parse_args()
    if args.no_gc_freeze:
        _no_gc_freeze()

    kw = dict(dtype=args.dtype, max_num_seqs=max(args.batch_sizes), kv_cache_memory_gb=args.kv_cache_memory_gb,
              load_format=args.load_format, enable_prefix_caching=args.prefix_caching)

    def prompts_for(bs: int) -> list[str]:
        return eval_prompts(bs * max(args.queue, cdiv(args.min_prompts, bs)), split=args.split)
    # Every configuration lives side by side and the timed runs alternate between them
    # (--repeats rounds, the median kept): a machine that drifts or stalls mid-run (a busy host
    # CPU moves this small model's steps by 2x) hits plain and Medusa alike.
    def config_kw(tree: str) -> dict:
        if tree in ("plain", "none"):  # "none": a second engine without speculation, the A/A row
            return kw
        spec = {"heads": args.heads, "tree": tree.removesuffix(SYNC), "acceptance": args.acceptance}
        if tree.removesuffix(SYNC) == "backoff":
            spec.update(tree="auto", backoff=True)
        base = tree.removesuffix(SYNC)
        if base == "adaptive" or base.startswith("adaptive:"):  # per-sequence trees cut from the full tree
            spec.update(tree=base.partition(":")[2] or "auto", adaptive=True)
        return {**kw, "speculative": spec}

    engines: dict = {}
    for tree in ["plain"] + args.trees:
        if args.process_per_engine:
            engines[tree] = EngineProcess(args.model, config_kw(tree), not args.no_gc_freeze)
        else:
            engines[tree] = Engine(args.model, **config_kw(tree))
        if tree.endswith(SYNC):
            if args.process_per_engine:
                raise SystemExit(f"--trees {tree}: the {SYNC} variant needs the engines in this process")
            engines[tree].executor.execute = _without_deferral(engines[tree].executor.execute)
        if engines[tree].step_latency is not None:
            print("back-off latency model [batch, candidates, ms]:", engines[tree].step_latency, flush=True)
    infos = {name: e.info if args.process_per_engine else engine_info(e) for name, e in engines.items()}
    env = environment(torch.device(infos["plain"]["device"]), getattr(torch, infos["plain"]["dtype"]),
                      "SmolLM2-135M-Instruct" if args.model == "default" else args.model)
    env.update(heads=args.heads, cuda_graphs=infos["plain"]["num_graphs"] > 0, prompt_split=args.split,
               graph_capture_s=infos["plain"]["graph_capture_s"], repeats=args.repeats,
               # Per engine: CUDA graphs captured at start-up, their seconds and memory, start-up.
               engines={name: {k: i[k] for k in ("num_graphs", "graph_capture_s", "graph_memory_gb", "startup_s")}
                        for name, i in infos.items()},
               gc_frozen=not args.no_gc_freeze, process_per_engine=args.process_per_engine,
               load=f"queue x{args.queue}" if args.queue else "static batches")

    def call(name: str, fn, *a):
        return engines[name].call(fn.__name__, *a) if args.process_per_engine else fn(engines[name], *a)

    rows = []
    base = {}
    extra: dict[int, dict] = {bs: {} for bs in args.batch_sizes}
    cells = [(bs, t) for t in args.temperatures for bs in args.batch_sizes]
    for bs, t in cells:
        prompts = prompts_for(bs)
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for name in engines:
            call(name, warm_up, prompts, args.max_tokens, bs, t, args.queue > 0)
        names = list(engines)
        for rep in range(args.repeats):
            # Each repeat starts one engine later (plain first, then second, ...), so that no
            # configuration always runs in the same place of a repeat, right after the same one.
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                runs[name].append(call(name, timed, prompts, args.max_tokens, bs, t, args.queue > 0))
        ref = median_run(runs["plain"])
        base[bs, t] = ref["tokens"], ref["tok_s"], ref["step_ms"], ref["decode_ms"]
        print(f"plain batch {bs} T={t}: {ref['tok_s']:.1f} tok/s, {ref['step_ms']:.2f} ms/step, "
              f"{ref['decode_ms']:.2f} ms/decode step", flush=True)
        for tree in args.trees:
            r = median_run(runs[tree])
            ratios = [m["tok_s"] / p["tok_s"] for m, p in zip(runs[tree], runs["plain"])]
            rows.append({**env, "config": f"{tree} T={t:g}", "tree": tree,
                         "tree_nodes": infos[tree]["tree_nodes"],
                         "temperature": t, "acceptance": args.acceptance if t else "greedy", "batch_size": bs,
                         "plain_tok_s": ref["tok_s"], "medusa_tok_s": r["tok_s"],
                         # The median of the repeats' ratios: each repeat ran plain decoding and
                         # this configuration back to back, so a slow spell of the machine hits
                         # both sides of a ratio (a ratio of two medians can pair runs from
                         # different spells: at batch 128 runs of 1.06, 0.99, 0.83 read 0.85).
                         "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                         "speedup_runs": [round(x, 3) for x in ratios],
                         # Per timed run, plain's then this configuration's: GC pauses (ms) and
                         # steps that captured a graph first (either one spoils a run's timing).
                         "gc_ms_runs": [[p["gc_ms"], m["gc_ms"]] for m, p in zip(runs[tree], runs["plain"])],
                         "capture_steps_runs": [[p["capture_steps"], m["capture_steps"]]
                                                for m, p in zip(runs[tree], runs["plain"])],
                         # A run with a capture is spoilt: flagged here, never silently averaged in.
                         "capture_steps": sum(p["capture_steps"] + m["capture_steps"]
                                              for m, p in zip(runs[tree], runs["plain"])),
                         "graph_miss_steps": sum(p["graph_miss_steps"] + m["graph_miss_steps"]
                                                 for m, p in zip(runs[tree], runs["plain"])),
                         "plain_step_ms": ref["step_ms"], "medusa_step_ms": r["step_ms"],
                         "plain_decode_ms": ref["decode_ms"], "medusa_decode_ms": r["decode_ms"], **extra[bs],
                         "mean_accepted": r["mean_accepted"], "per_head_acceptance": r["per_head_acceptance"],
                         # Tree candidates verified per sequence and decode step: the verify work spent.
                         "mean_verified": r["mean_verified"],
                         "steps_by_tree_size": r["steps_by_tree_size"],
                         "greedy_identical": r["tokens"] == ref["tokens"] if t == 0 else None})
            print_table([rows[-1]], ["config", "batch_size", "plain_tok_s", "medusa_tok_s", "speedup", "speedup_min",
                                     "mean_accepted", "mean_verified", "plain_decode_ms", "medusa_decode_ms", "capture_steps",
                                     "graph_miss_steps"])
    for eng in engines.values():
        eng.shutdown()
    engines.clear()  # the GPU memory for what follows
    if args.hf:
        from transformers import AutoModelForCausalLM

        from benchmarks.throughput import bench_hf

        from transformers import AutoTokenizer

        from engine.models.loader import resolve_model_path

        model_path = resolve_model_path(args.model, "auto")
        device, dtype = torch.device(infos["plain"]["device"]), getattr(torch, infos["plain"]["dtype"])
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device).eval()
        for bs in args.batch_sizes:
            n, dt = bench_hf(hf, tokenizer, eval_prompts(bs), args.max_tokens, device)
            extra[bs].update(hf_tok_s=n / dt, plain_vs_hf=base[bs, args.temperatures[0]][1] / (n / dt))
        del hf
    if args.eager:
        eager = Engine(args.model, enforce_eager=True, **kw)
        for bs in args.batch_sizes:
            _, tok_s, step_ms, decode_ms = run(eager, prompts_for(bs), args.max_tokens, bs)
            extra[bs].update(plain_eager_tok_s=tok_s, plain_eager_step_ms=step_ms, plain_eager_decode_ms=decode_ms,
                             graphs_vs_eager=base[bs, args.temperatures[0]][1] / tok_s)
        eager.shutdown()
        del eager
    for row in rows:
        row.update(extra[row["batch_size"]])

    def plot(ax, rows):
        bss = sorted({r["batch_size"] for r in rows})
        first = [r for r in rows if r["config"] == rows[0]["config"]]
        ax.plot(bss, [r["plain_tok_s"] for r in first], "k--o", label="plain decoding")
        if "plain_eager_tok_s" in first[0]:
            ax.plot(bss, [r["plain_eager_tok_s"] for r in first], "k:x", label="plain decoding, eager")
        if "hf_tok_s" in first[0]:
            ax.plot(bss, [r["hf_tok_s"] for r in first], "s:", color="grey", label="HF transformers generate")
        for t in dict.fromkeys(r["temperature"] for r in rows):
            if t:  # sampled plain decoding: its own baseline
                tr = [r for r in rows if r["tree"] == rows[0]["tree"] and r["temperature"] == t]
                ax.plot([r["batch_size"] for r in tr], [r["plain_tok_s"] for r in tr], "--^", color="grey",
                        label=f"plain decoding T={t:g}")
        for config in dict.fromkeys(r["config"] for r in rows):
            tr = [r for r in rows if r["config"] == config]
            ax.plot([r["batch_size"] for r in tr], [r["medusa_tok_s"] for r in tr], "o-", label=f"Medusa {config}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")

    print(f"\n{env}")
    print_table(rows, ["config", "tree_nodes", "batch_size", "plain_tok_s", "medusa_tok_s", "speedup", "speedup_min",
                       "speedup_runs", "mean_accepted", "mean_verified", "plain_decode_ms", "medusa_decode_ms", "capture_steps",
                       "graph_miss_steps", "greedy_identical"])
    spoilt = [f"{r['config']} b{r['batch_size']}" for r in rows if r["capture_steps"]]
    if spoilt:
        print("WARNING: timed runs captured CUDA graphs (their timings are spoilt):", ", ".join(spoilt))
    print_table([r for r in rows if r["config"] == rows[0]["config"]],
                ["batch_size", "plain_step_ms", "plain_decode_ms", "plain_eager_decode_ms", "graphs_vs_eager",
                 "hf_tok_s", "plain_vs_hf"])
    print("wrote", write_results("speculative", env, rows, plot))


if __name__ == "__main__":
    main()
