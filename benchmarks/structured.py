"""Structured outputs: plain decoding vs Medusa (a fixed tree, back-off, and the fixed tree
without grammar pruning) x constrained (JSON schemas, JSON mode) vs free text, per batch size.

Prompts are held-out-source chat prompts (engine/training/data.py's split "heldout") turned
into extraction tasks: "read this message and fill in the fields". Five constraints take turns
over the prompts — a flat object, a nested one, an enum-heavy one, one of arrays, and JSON mode
(any object) — and the free rows run the same prompts unconstrained. Per row: output tokens/s,
tokens per decode step, the speed-up over plain decoding in the same mode, the share of outputs
token-identical to plain decoding's (greedy: must be 1.0), and for constrained rows the share of
outputs that ended by the grammar (finish "stop") and the share of those valid under their
schema (jsonschema; must be 1.0). Configurations alternate within each repeat.

    python benchmarks/structured.py --tree auto --batch-sizes 1 4 --prompts-per-batch 8       # CPU
    python benchmarks/structured.py --batch-sizes 1 16 64                                      # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, print_table, write_results  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.engine import Engine  # noqa: E402

SCHEMAS = {
    "flat": {"type": "object", "additionalProperties": False, "required": ["title", "topic", "language", "words"],
             "properties": {"title": {"type": "string", "maxLength": 60}, "topic": {"type": "string", "maxLength": 40},
                            "language": {"type": "string", "maxLength": 20}, "words": {"type": "integer"}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["request", "answer"],
               "properties": {
                   "request": {"type": "object", "additionalProperties": False, "required": ["summary", "intent"],
                               "properties": {"summary": {"type": "string", "maxLength": 80},
                                              "intent": {"type": "string", "maxLength": 30}}},
                   "answer": {"type": "object", "additionalProperties": False, "required": ["short", "confidence"],
                              "properties": {"short": {"type": "string", "maxLength": 80},
                                             "confidence": {"type": "number"}}}}},
    "enums": {"type": "object", "additionalProperties": False,
              "required": ["category", "sentiment", "urgency", "needs_code", "audience"],
              "properties": {"category": {"enum": ["coding", "math", "writing", "science", "advice", "other"]},
                             "sentiment": {"enum": ["positive", "neutral", "negative"]},
                             "urgency": {"enum": ["low", "medium", "high"]}, "needs_code": {"type": "boolean"},
                             "audience": {"enum": ["child", "student", "professional", "general"]}}},
    "arrays": {"type": "object", "additionalProperties": False, "required": ["keywords", "steps"],
               "properties": {"keywords": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                           "maxItems": 5},
                              "steps": {"type": "array", "items": {"type": "string", "maxLength": 60},
                                        "maxItems": 4}}},
    "json_mode": None,
}


def task(prompt: str, schema_name: str) -> str:
    if SCHEMAS[schema_name] is None:
        return f"{prompt}\n\nAnswer with a JSON object."
    fields = ", ".join(SCHEMAS[schema_name]["properties"])
    return (f"Read the following message and describe it as a JSON object with the fields {fields}.\n\n"
            f"Message: {prompt}")


def constraint(schema_name: str) -> dict:
    schema = SCHEMAS[schema_name]
    return {"json_object": True} if schema is None else {"json": schema}


def valid(schema_name: str, text: str) -> bool:
    import jsonschema

    try:
        value = json.loads(text)
        if SCHEMAS[schema_name] is None:
            return isinstance(value, dict)
        jsonschema.validate(value, SCHEMAS[schema_name])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run(engine: Engine, prompts: list[str], params: list[SamplingParams], batch: int) -> tuple[list, float]:
    engine.reset_stats()
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += engine.generate_batch(prompts[i:i + batch], params[i:i + batch], chat=True)
    return outs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default="mc_sim_7b_63", help="the fixed tree (a preset or 'auto'; default: %(default)s)")
    ap.add_argument("--configs", nargs="+", default=["plain", "fixed", "backoff", "unpruned"],
                    help="plain, fixed (the tree), backoff, unpruned (the tree without grammar pruning)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompts-per-batch", type=int, default=16,
                    help="prompts per row: max(this, batch size), in static batches (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    ap.add_argument("--split", default="heldout")
    args = ap.parse_args()

    kw = dict(kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=max(args.batch_sizes),
              enable_prefix_caching=False)
    specs = {"plain": None, "fixed": {"tree": args.tree, "acceptance": "greedy"},
             "backoff": {"tree": "auto", "backoff": True, "acceptance": "greedy"},
             "unpruned": {"tree": args.tree, "acceptance": "greedy", "grammar_pruning": False}}
    engines = {name: Engine(speculative=specs[name], **kw) for name in args.configs}
    first = engines[args.configs[0]]
    for eng in engines.values():  # warm-up (and the grammar engine's tokenizer view)
        eng.generate_batch(["Hi"], SamplingParams(temperature=0, max_tokens=4, structured_outputs={"json_object": True}))
    names = list(SCHEMAS)
    rows = []
    for b in args.batch_sizes:
        n = max(args.prompts_per_batch, b)
        raw = eval_prompts(n, max_chars=400, split=args.split)
        kinds = [names[i % len(names)] for i in range(n)]
        prompts = [task(p, k) for p, k in zip(raw, kinds)]
        for rep in range(args.repeats):
            for mode in ("free", "constrained"):
                params = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                         structured_outputs=constraint(k) if mode == "constrained" else None)
                          for k in kinds]
                results = {}
                for name, eng in engines.items():
                    outs, secs = run(eng, prompts, params, b)
                    results[name] = outs
                    tokens = sum(len(o.token_ids) for o in outs)
                    row = {"config": name, "mode": mode, "batch": b, "repeat": rep, "prompts": n,
                           "tok_s": round(tokens / secs, 1), "tokens_per_step": round(eng.stats.mean_accepted_length, 3),
                           "output_tokens": tokens}
                    if mode == "constrained":
                        stopped = [(o, k) for o, k in zip(outs, kinds) if o.finish_reason == "stop"]
                        row["stopped"] = round(len(stopped) / n, 3)
                        row["valid_of_stopped"] = round(sum(valid(k, o.text) for o, k in stopped) / max(1, len(stopped)), 3)
                    rows.append(row)
                ref = results.get("plain")
                for r in rows[-len(engines):]:
                    if ref is not None:
                        r["same_as_plain"] = round(sum(a.token_ids == p.token_ids for a, p in
                                                       zip(results[r["config"]], ref)) / n, 3)
                        plain_row = next(x for x in rows[-len(engines):] if x["config"] == "plain")
                        r["vs_plain"] = round(r["tok_s"] / plain_row["tok_s"], 3)
                print_table(rows[-len(engines):], list(rows[-1]))
    env = {**environment(first.device, first.dtype, first.model_path.name), "tree": args.tree,
           "max_tokens": args.max_tokens, "split": args.split, "grammar_backend": "llguidance",
           "capture_steps": sum(e.stats.num_capture_steps for e in engines.values()),
           "schemas": names}
    print(env)
    cols = ["config", "mode", "batch", "repeat", "tok_s", "vs_plain", "tokens_per_step", "same_as_plain", "stopped",
            "valid_of_stopped"]
    print_table(rows, [c for c in cols if any(c in r for r in rows)])

    def plot(ax, rows_):
        for name in engines:
            for mode, style in (("free", "--"), ("constrained", "-")):
                pts = [r for r in rows_ if r["config"] == name and r["mode"] == mode and r["repeat"] == 0]
                ax.plot([r["batch"] for r in pts], [r["tok_s"] for r in pts], style, marker="o", label=f"{name}, {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("output tokens/s")
    print("wrote", write_results("structured", env, rows, plot))


if __name__ == "__main__":
    main()
