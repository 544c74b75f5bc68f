"""Multi-turn chat replay: what prefix caching saves, with and without Medusa.

Every conversation sits behind one shared system prompt (~1,000 tokens) and has 2-4 user turns;
a turn's prompt is the whole conversation so far — the system prompt, earlier turns and the
model's own answers — plus the next user message. User messages come from the training prompt
files (split "train"; never the evaluation prompts). At most C conversations are in flight: a
finished turn queues the conversation's next turn at once, a finished conversation lets the next
one start. Rows: prefix caching on / off x plain decoding / Medusa with back-off, per
concurrency: TTFT p50 / p99 (a turn's arrival to its first token), output tokens/s over the
replay, and the prefix-cache hit rate (prompt tokens served from the cache).

    python benchmarks/multi_turn.py --concurrency 1 4 --conversations 8 --max-tokens 32   # CPU
    python benchmarks/multi_turn.py --concurrency 1 16 64 --conversations 64              # GPU

Each engine replays the same conversations; engines are built once and the replays of a
concurrency level run configuration after configuration, each against a fresh cache
(``Engine.reset_prefix_cache``) so no replay finds another's turns.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_PROMPTS, environment, eval_prompts, print_table, write_results  # noqa: E402
from engine import Engine, SamplingParams  # noqa: E402

# A shared system prompt of ~1,000 tokens (SmolLM2's tokenizer): a deployment's instructions.
SYSTEM = " ".join([
    "You are the assistant of a software company's support desk.",
    "Answer in plain language, briefly and precisely; say so when you do not know.",
    "Never invent product names, prices, dates, version numbers or policies.",
    "When a question is ambiguous, state the reading you answer and answer it.",
    "Prefer short paragraphs and numbered steps for procedures; avoid tables.",
    "Quote error messages exactly as the user wrote them; do not paraphrase them.",
    "If the user shares code, point at the line and say what to change, not the whole file.",
    "Keep personal data out of answers: no names, addresses or account numbers.",
] * 9)


def conversations(n: int, path: Path, seed: int) -> list[list[str]]:
    """n conversations of 2-4 user messages each, from the training split of ``path``."""
    rng = random.Random(seed)
    pool = eval_prompts(4 * n + 8, path, max_chars=400, split="train")
    rng.shuffle(pool)
    it = iter(pool)
    return [[next(it) for _ in range(rng.randint(2, 4))] for _ in range(n)]


def replay(engine: Engine, convs: list[list[str]], concurrency: int, params: SamplingParams) -> dict:
    """Run every conversation turn by turn, at most ``concurrency`` in flight."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in convs]
    turn = [0] * len(convs)
    waiting = deque(range(len(convs)))
    active: dict[str, int] = {}
    ttft, out_tokens = [], 0
    queries0, hits0 = engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits

    def submit(ci: int) -> None:
        histories[ci].append({"role": "user", "content": convs[ci][turn[ci]]})
        active[engine.add_request(engine.encode_messages(histories[ci]), params)] = ci

    for _ in range(min(concurrency, len(convs))):
        submit(waiting.popleft())
    t0 = time.perf_counter()
    while active:
        for o in engine.step():
            if not o.finished:
                continue
            ci = active.pop(o.request_id)
            ttft.append(o.metrics.first_token_time - o.metrics.arrival_time)
            out_tokens += len(o.token_ids)
            histories[ci].append({"role": "assistant", "content": o.text})
            turn[ci] += 1
            if turn[ci] < len(convs[ci]):
                submit(ci)
            elif waiting:
                submit(waiting.popleft())
    wall = time.perf_counter() - t0
    queries = engine.stats.prefix_cache_queries - queries0
    hits = engine.stats.prefix_cache_hits - hits0
    ttft.sort()
    return {"turns": len(ttft), "output_tokens": out_tokens, "seconds": round(wall, 3),
            "output_tok_s": round(out_tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
            "hit_rate": round(hits / queries, 4) if queries else 0.0, "prompt_tokens": queries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                    help="JSONL whose 'train' split gives the user messages (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-medusa", action="store_true", help="plain decoding only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="replays per row, interleaved configuration by configuration (default: %(default)s)")
    args = ap.parse_args()

    convs = conversations(args.conversations, Path(args.prompts), args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    kw = dict(dtype=args.dtype, load_format=args.load_format, kv_cache_memory_gb=args.kv_cache_memory_gb,
              max_num_seqs=max(args.concurrency), max_num_batched_tokens=4096)
    configs = [("plain", None)] + ([] if args.no_medusa else
                                   [("medusa-backoff", {"heads": args.heads, "tree": "auto", "backoff": True})])
    engines = {(name, caching): Engine(args.model, speculative=spec, enable_prefix_caching=caching, **kw)
               for name, spec in configs for caching in (True, False)}
    first = next(iter(engines.values()))
    for eng in engines.values():  # warm-up: one short conversation, then a clean slate
        replay(eng, convs[:1], 1, SamplingParams(temperature=0, max_tokens=4))
        eng.reset_prefix_cache()
    rows = []
    for c in args.concurrency:
        for rep in range(args.repeats):  # interleaved: every configuration once, then again
            for (name, caching), eng in engines.items():
                eng.reset_prefix_cache()
                row = {"config": name, "prefix_caching": caching, "concurrency": c, "repeat": rep,
                       **replay(eng, convs, c, params)}
                rows.append(row)
                print_table([row], list(row))
    env = {**environment(first.device, first.dtype, first.model_path.name), "conversations": len(convs),
           "turns": sum(len(cv) for cv in convs), "max_tokens": args.max_tokens,
           "system_prompt_tokens": len(first.encode(SYSTEM)), "prompt_split": "train (user messages)",
           "repeats": args.repeats, "load_format": args.load_format}
    print(env)
    for r in rows:  # caching on against off, same configuration, concurrency and repeat
        off = next(x for x in rows if x["config"] == r["config"] and x["concurrency"] == r["concurrency"]
                   and x["repeat"] == r["repeat"] and not x["prefix_caching"])
        r["ttft_p50_vs_off"] = round(off["ttft_p50_ms"] / r["ttft_p50_ms"], 2)
        r["tok_s_vs_off"] = round(r["output_tok_s"] / off["output_tok_s"], 2)
    print_table(rows, ["config", "prefix_caching", "concurrency", "repeat", "turns", "ttft_p50_ms", "ttft_p99_ms",
                       "output_tok_s", "hit_rate", "ttft_p50_vs_off", "tok_s_vs_off"])

    def plot(ax, rows_):
        for (name, caching) in engines:
            pts = [r for r in rows_ if r["config"] == name and r["prefix_caching"] == caching and r["repeat"] == 0]
            ax.plot([r["concurrency"] for r in pts], [r["ttft_p50_ms"] for r in pts], marker="o",
                    label=f"{name}, caching {'on' if caching else 'off'}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent conversations")
        ax.set_ylabel("TTFT p50 (ms)")
    print("wrote", write_results("multi-turn", env, rows, plot))


if __name__ == "__main__":
    main()
