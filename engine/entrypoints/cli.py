"""`medusa-engine` command line: generate (with a Medusa vs plain comparison)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from engine.spec.tree import PRESETS

DEMO_PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short Python function that checks whether a number is prime.",
    "List five tips for staying productive when working from home.",
    "What is the difference between a list and a tuple in Python?",
]


def _tree_arg(text: str):
    """--tree: a name, or a JSON list of choice tuples."""
    return json.loads(text) if text.lstrip().startswith("[") else text


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kw = {"dtype": args.dtype, "device": args.device, "enforce_eager": args.enforce_eager,
          "enable_prefix_caching": args.enable_prefix_caching}
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.kv_cache_memory_gb:
        kw["kv_cache_memory_gb"] = args.kv_cache_memory_gb
    if args.tensor_parallel_size > 1 or args.ray_address:
        kw.update(executor="ray", tensor_parallel_size=args.tensor_parallel_size, ray_address=args.ray_address)
    return kw


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine and Medusa flags that `generate` and `serve` share (read by _engine_kwargs
    and _speculative)."""
    p.add_argument("--medusa", action="store_true", help="speculate with Medusa heads")
    p.add_argument("--heads", default="default",
                   help="'default' (the bundled model's heads), 'random' or a heads directory (default: %(default)s)")
    p.add_argument("--tree", default="mc_sim_7b_63",
                   help="'auto' (timed on this device), a preset (" + ", ".join(sorted(PRESETS)) + "), 'chain:K', "
                        "or a JSON list of choice tuples (default: %(default)s)")
    from engine.sample.acceptance import ACCEPTANCE_RULES

    p.add_argument("--acceptance", default="typical", choices=list(ACCEPTANCE_RULES),
                   help="acceptance rule: " + "; ".join(f"{r.name}: {r.summary}" for r in ACCEPTANCE_RULES.values())
                        + " (default: %(default)s)")
    p.add_argument("--backoff", action="store_true", help="size the tree per step from measured step latency")
    p.add_argument("--adaptive", action="store_true",
                   help="size every sequence's tree on its own from its heads' calibrated confidence, under a "
                        "budget from measured step latency (exclusive with --backoff)")
    p.add_argument("--proposal-vocab", default="heads", choices=["heads", "full"],
                   help="tokens the heads may propose: the heads' proposal_vocab.json when shipped (heads), "
                        "or the full vocabulary (full); output is exact either way (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU; bfloat16 on a CPU is the opt-in bf16 mode "
                        "(a CPU with AVX-512 or AMX; greedy Medusa == plain in it) (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=0,
                   help="most sequences in one step (default: 0 = the engine's default)")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="longest context (prompt + output) a request may have (default: 0 = the model's)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.0,
                   help="memory for the paged KV cache in GiB (default: 0 = the engine's default)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode/verify steps")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute every prompt instead of reusing the K/V of prefixes seen before "
                        "(default: prefix caching on)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                   help="split the model over this many Ray workers, docs/ray.md (default: %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto': the one on this machine; default: a local Ray)")


def _speculative(args: argparse.Namespace) -> dict:
    return {"heads": args.heads, "tree": _tree_arg(args.tree), "acceptance": args.acceptance, "backoff": args.backoff,
            "adaptive": args.adaptive, "proposal_vocab": args.proposal_vocab}


def _run(engine, prompts, params, chat):
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params, chat=chat)
    dt = time.perf_counter() - t0
    ntok = sum(len(o.token_ids) for o in outs)
    return outs, dt, ntok


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.core.sampling_params import SamplingParams
    from engine.engine import Engine

    prompts = args.prompt or DEMO_PROMPTS
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                            top_p=args.top_p)
    rows = []
    texts = None
    if args.medusa:
        eng = Engine(args.model, speculative=_speculative(args), **_engine_kwargs(args))
        if eng.tree_autotune:
            print("tree=auto, verify-step latency per tree size on this device:")
            for row in eng.tree_autotune:
                print("  ", row)
            best = next(r for r in eng.tree_autotune if r["nodes"] == eng.tree.num_nodes - 1)
            print(f"   chosen: {best['nodes']} nodes — the best estimated speed-up, {best['est_speedup']:.2f}x plain "
                  f"({best['expected_tokens_per_step']:.2f} tokens a step expected from the heads' accuracy; "
                  "step times are medians of interleaved rounds)")
        _run(eng, prompts[:1], SamplingParams(temperature=0, max_tokens=4), args.chat)  # warm-up
        eng.reset_stats()
        outs, dt, ntok = _run(eng, prompts, params, args.chat)
        texts = outs
        rows.append(("medusa", ntok, dt, eng.stats.mean_accepted_length, eng.stats.per_head_acceptance))
        eng.shutdown()
        del eng
    # Plain decoding: the output without --medusa, the baseline with it.
    eng = Engine(args.model, **_engine_kwargs(args))
    _run(eng, prompts[:1], SamplingParams(temperature=0, max_tokens=4), args.chat)
    eng.reset_stats()
    outs, dt, ntok = _run(eng, prompts, params, args.chat)
    rows.append(("plain", ntok, dt, eng.stats.mean_accepted_length, []))
    eng.shutdown()
    if args.medusa and params.greedy:
        same = all(a.token_ids == b.token_ids for a, b in zip(texts, outs))
        print(f"greedy outputs identical with and without Medusa: {same}")
    texts = texts or outs
    for p, o in zip(prompts, texts):
        print(f"\n>>> {p}\n{o.text}")
    print(f"\n{'mode':8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'tok/step':>9}  per-head acceptance")
    for name, ntok, dt, mal, heads in rows:
        print(f"{name:8} {ntok:7d} {dt:8.2f} {ntok / dt:8.1f} {mal:9.2f}  "
              + " ".join(f"{h:.2f}" for h in heads))
    if len(rows) == 2:
        speedup = (rows[0][1] / rows[0][2]) / (rows[1][1] / rows[1][2])
        print(f"speed-up of Medusa over plain decoding: {speedup:.2f}x "
              f"(batch {len(prompts)}, {args.max_tokens} new tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"mode": r[0], "tokens": r[1], "seconds": r[2], "mean_accepted": r[3],
                        "per_head_acceptance": r[4]} for r in rows], f, indent=2)
    return 0


def cmd_train_heads(args: argparse.Namespace) -> int:
    import json as _json
    from dataclasses import fields

    from engine.engine import Engine
    from engine.training.train import TrainConfig, measure_acceptance, read_training_prompts, run_training

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    engine = Engine(args.model, dtype=args.dtype, device=args.device, max_num_seqs=cfg.gen_batch,
                    max_num_batched_tokens=max(8192, cfg.gen_batch * 4), kv_cache_memory_gb=args.kv_cache_memory_gb)
    report = run_training(cfg, engine)
    model_path = str(engine.model_path)
    del engine
    prompts = [p for _, p in read_training_prompts(cfg.prompts, "heldout", cfg.max_prompt_chars)][: cfg.max_eval_prompts]
    # Accepted lengths do not depend on CUDA graphs: eager engines skip the captures.
    kw = dict(dtype=args.dtype, device=args.device, enforce_eager=True)
    trees = (["mc_sim_7b_63"] if cfg.num_heads >= 4 else []) + ["tree.json"]
    for tree in trees:
        spec_tree = tree if tree != "tree.json" else _json.loads((Path(cfg.out) / "tree.json").read_text())["choices"]
        report[f"accepted_{tree}_greedy"] = measure_acceptance(model_path, cfg.out, prompts, cfg.eval_tokens,
                                                               tree=spec_tree, **kw)
    (Path(cfg.out) / "train_report.json").write_text(_json.dumps(report, indent=1))
    print(_json.dumps({k: v for k, v in report.items() if k not in ("config", "history")}, indent=1))
    return 0


def cmd_export_heads(args: argparse.Namespace) -> int:
    from engine.models.loader import load_state_dict, read_arch_config, resolve_model_path
    from engine.spec.heads import MedusaHeads, export_vllm

    model_dir = resolve_model_path(args.model)
    arch = read_arch_config(model_dir)
    heads = MedusaHeads.load(args.heads, arch.hidden_size, arch.vocab_size)
    lm_head = None
    if heads.shared_lm_head:
        state = load_state_dict(model_dir)
        lm_head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    export_vllm(heads, args.out, lm_head)
    print(f"wrote vLLM Medusa checkpoint to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.entrypoints.server import serve

    kw = _engine_kwargs(args)
    if args.medusa:
        kw["speculative"] = _speculative(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("MEDUSA_ENGINE_API_KEY") or None
    serve(kw, args.model, args.host, args.port, args.served_model_name, args.max_request_bytes, args.drain_timeout_s,
          api_key, args.log_level)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medusa-engine")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="medusa-engine")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="cmd", metavar="{generate,train-heads,export-heads,serve}")
    g = sub.add_parser("generate", help="generate text; with --medusa, compare with plain decoding")
    model_help = "'default' (the bundled SmolLM2-135M-Instruct) or a local HF directory (default: %(default)s)"
    g.add_argument("--model", default="default", help=model_help)
    g.add_argument("--prompt", action="append", help="repeat for a batch (default: demo prompts)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    _engine_flags(g)
    g.add_argument("--json", help="write the timing rows here")
    t = sub.add_parser("train-heads", help="train Medusa heads on self-distilled data (Medusa-1)")
    t.add_argument("--model", default="default", help=model_help)
    t.add_argument("--out", required=True, help="heads directory to write")
    from dataclasses import MISSING, fields

    from engine.training.train import TRAIN_CHOICES, TrainConfig

    # Every TrainConfig field is a flag, with the dataclass's default (one place for defaults).
    for f in fields(TrainConfig):
        if f.name == "out":
            continue
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                       default=None if f.default is MISSING else f.default, choices=TRAIN_CHOICES.get(f.name),
                       help=f.metadata["help"])
    t.add_argument("--dtype", default="auto", help="dtype of the distilling engine and the training (default: "
                                                  "%(default)s: bfloat16 on CUDA, float32 on CPU)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    t.add_argument("--kv-cache-memory-gb", type=float, default=4.0,
                   help="KV cache of the distilling engine (default: %(default)s)")
    e = sub.add_parser("export-heads", help="write heads in vLLM's Medusa checkpoint layout")
    e.add_argument("--heads", required=True, help="heads directory (Medusa-1 heads)")
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--model", default="default",
                   help="base model (its lm_head is stored for shared heads) (default: %(default)s)")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    sv.add_argument("--model", default="default", help=model_help)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    sv.add_argument("--served-model-name", default=None,
                    help="the model name clients use (default: the --model value; SmolLM2-135M-Instruct for default)")
    sv.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                    help="larger request bodies get 413 (default: %(default)s)")
    sv.add_argument("--drain-timeout-s", type=float, default=30.0,
                    help="on SIGTERM/SIGINT, how long in-flight requests may finish before they are aborted "
                         "(default: %(default)s)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise; /health and "
                         "/metrics stay open); default: $MEDUSA_ENGINE_API_KEY, else no key")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="server and engine log level (default: %(default)s)")
    _engine_flags(sv)
    args = ap.parse_args(argv)
    if args.cmd is None:  # bare `medusa-engine`: what it can do, not argparse's "required: cmd"
        ap.print_help(sys.stderr)
        return 2
    import logging

    # Start-up progress (model conversion, graph capture, timings) on stderr; results on stdout.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return {"generate": cmd_generate, "train-heads": cmd_train_heads, "export-heads": cmd_export_heads,
                "serve": cmd_serve}[args.cmd](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
