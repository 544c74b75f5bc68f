"""Tokens/s and latency: this engine (plain decoding) vs HF transformers `generate`, same
prompts, model, dtype, batch sizes, greedy, fixed number of new tokens; one run side by side.

    python benchmarks/throughput.py --batch-sizes 1 4 16 --max-tokens 32        # CPU
    python benchmarks/throughput.py --batch-sizes 1 4 16 64 --max-tokens 256    # GPU

With ``--tp 1 2`` it compares tensor-parallel sizes instead (Ray executor, plain and Medusa
decoding, TP=1 on the same executor so the ratio shows what splitting the model buys):

    python benchmarks/throughput.py --tp 1 2 --batch-sizes 1 16 64 --heads default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, print_table, write_results  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine import SamplingParams  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_engine(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.generate_batch(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    sync(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params, chat=True)
    sync(engine.device)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs), dt


def bench_hf(hf, tok, prompts, max_tokens, device):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.no_grad():
        hf.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        sync(device)
    dt = time.perf_counter() - t0
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes to compare (Ray executor)")
    ap.add_argument("--heads", default="default", help="Medusa heads for the --tp comparison ('none': plain only)")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--load-format", default="auto", help="'dummy': random weights (see dummy_model.py)")
    args = ap.parse_args()
    if args.load_format == "dummy":
        args.no_hf = True  # HF has no weights to load from a dummy directory
    if args.tp:
        return tp_main(args)

    engine = Engine(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes), load_format=args.load_format)
    env = environment(engine.device, engine.dtype, "SmolLM2-135M-Instruct" if args.model == "default" else args.model)
    hf = tok = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(engine.model_path), dtype=engine.dtype).to(engine.device).eval()
        tok = engine.tokenizer
    rows = []
    for bs in args.batch_sizes:
        prompts = eval_prompts(bs)
        n, dt = bench_engine(engine, prompts, args.max_tokens)
        row = {**env, "batch_size": bs, "new_tokens": args.max_tokens, "engine_tok_s": n / dt,
               "engine_s": dt}
        if hf is not None:
            hn, hdt = bench_hf(hf, tok, prompts, args.max_tokens, engine.device)
            row.update(hf_tok_s=hn / hdt, hf_s=hdt, speedup=(n / dt) / (hn / hdt))
        rows.append(row)
        print_table([row], ["batch_size", "engine_tok_s", "hf_tok_s", "speedup"])

    def plot(ax, rows):
        bss = [r["batch_size"] for r in rows]
        ax.plot(bss, [r["engine_tok_s"] for r in rows], "o-", label="medusa-engine (plain decoding)")
        if "hf_tok_s" in rows[0]:
            ax.plot(bss, [r["hf_tok_s"] for r in rows], "s--", label="HF transformers generate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")

    print(f"\n{env}")
    print_table(rows, ["batch_size", "new_tokens", "engine_tok_s", "hf_tok_s", "speedup"])
    print("wrote", write_results("throughput", env, rows, plot))


def tp_main(args) -> None:
    """Tokens/s per TP size, plain and Medusa, same prompts; speedup relative to TP=1."""
    rows = []
    modes = [("plain", None)] + ([] if args.heads == "none" else
                                 [("medusa", {"heads": args.heads, "tree": args.tree})])
    env = None
    for tp in args.tp:
        for mode, spec in modes:
            eng = Engine(args.model, speculative=spec, dtype=args.dtype, max_num_seqs=max(args.batch_sizes),
                         executor="ray", tensor_parallel_size=tp, load_format=args.load_format)
            env = env or environment(eng.device, eng.dtype,
                                     "SmolLM2-135M-Instruct" if args.model == "default" else args.model)
            for bs in args.batch_sizes:
                eng.reset_stats()
                n, dt = bench_engine(eng, eval_prompts(bs), args.max_tokens)
                steps = eng.stats.num_steps
                rows.append({**env, "tp": tp, "mode": mode, "batch_size": bs, "new_tokens": args.max_tokens,
                             "tok_s": n / dt, "step_ms": 1e3 * dt / max(1, steps),
                             "mean_accepted": eng.stats.mean_accepted_length if spec else 1.0})
                base = next(r for r in rows if r["mode"] == mode and r["batch_size"] == bs)
                rows[-1]["speedup_vs_first_tp"] = rows[-1]["tok_s"] / base["tok_s"]
                print_table([rows[-1]], ["tp", "mode", "batch_size", "tok_s", "step_ms", "speedup_vs_first_tp"])
            eng.shutdown()

    def plot(ax, rows):
        for tp in args.tp:
            for mode, _ in modes:
                rs = [r for r in rows if r["tp"] == tp and r["mode"] == mode]
                ax.plot([r["batch_size"] for r in rs], [r["tok_s"] for r in rs], "o-" if mode == "plain" else "s--",
                        label=f"TP={tp} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")

    print(f"\n{env}")
    print_table(rows, ["tp", "mode", "batch_size", "tok_s", "step_ms", "mean_accepted", "speedup_vs_first_tp"])
    print("wrote", write_results("tensor-parallel", env, rows, plot))


if __name__ == "__main__":
    main()
