"""Tokens/s and latency: this engine (plain decoding) vs HF transformers `generate`, same
prompts, model, dtype, batch sizes, greedy, fixed number of new tokens; one run side by side.

    python benchmarks/throughput.py --batch-sizes 1 4 16 --max-tokens 32        # CPU
    python benchmarks/throughput.py --batch-sizes 1 4 16 64 --max-tokens 256    # GPU
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
from engine.sampling import SamplingParams  # noqa: E402


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
    args = ap.parse_args()

    engine = Engine(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes))
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


if __name__ == "__main__":
    main()
