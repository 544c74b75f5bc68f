"""Latency under load through the OpenAI server: /health and a new short request's time to
first token while long streams run, in milliseconds and in engine steps.

    python -m benchmarks.serve_latency --medusa --streams 16          # the 2-core CPU box

Starts the server on loopback (uvicorn in a thread, the engine on its own thread as in
`medusa-engine serve`), opens ``--streams`` streaming chat completions of ``--max-tokens``
tokens each, and while they run probes ``/health`` every 50 ms and, every ``--probe-every``
seconds, sends a short chat completion (held-out prompt, max_tokens=1) and times its first
token. Engine steps are timed on the engine thread (mean step time while the streams ran), so
TTFT is also reported as a number of steps. Writes a JSON row under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, eval_prompts, print_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--medusa", action="store_true")
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--probes", type=int, default=8, help="short requests sent while the streams run")
    ap.add_argument("--probe-every", type=float, default=1.5, help="seconds between short requests")
    args = ap.parse_args()

    import httpx
    import uvicorn

    from engine.async_engine import AsyncEngine
    from engine.engine import Engine
    from engine.entrypoints.server import build_app

    kw = {"speculative": {"heads": "default", "tree": args.tree}} if args.medusa else {}
    engine = Engine("default", max_num_seqs=args.streams + 4, **kw)
    steps: list[float] = []
    real_step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        out = real_step()
        steps.append(time.perf_counter() - t0)
        return out
    engine.step = timed_step
    aeng = AsyncEngine(engine)
    server = uvicorn.Server(uvicorn.Config(build_app(aeng, "default"), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    prompts = eval_prompts(args.streams + args.probes)

    async def stream(client, prompt):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": 0, "stream": True}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    async def health(client, lags, done):
        while not done.is_set():
            t0 = time.perf_counter()
            (await client.get(f"{url}/health")).raise_for_status()
            lags.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    async def first_token_s(client, prompt):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0,
                "stream": True}
        t0 = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if '"content":' in line and '"content":""' not in line:
                    return time.perf_counter() - t0
        return time.perf_counter() - t0

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            await first_token_s(client, prompts[0])  # warm-up
            steps.clear()
            done, lags, ttfts = asyncio.Event(), [], []
            streams = [asyncio.create_task(stream(client, p)) for p in prompts[:args.streams]]
            probe = asyncio.create_task(health(client, lags, done))
            await asyncio.sleep(2 * args.probe_every)  # the streams are decoding
            n_steps_before = len(steps)
            for p in prompts[args.streams:args.streams + args.probes]:
                ttfts.append(await first_token_s(client, p))
                await asyncio.sleep(args.probe_every)
            step_s = statistics.mean(steps[n_steps_before:]) if len(steps) > n_steps_before else float("nan")
            await asyncio.gather(*streams)
            done.set()
            await probe
            return lags, ttfts, step_s

    lags, ttfts, step_s = asyncio.run(run())
    server.should_exit = True
    engine.shutdown()
    env = environment(engine.device, engine.dtype, "SmolLM2-135M-Instruct")
    lags_ms = sorted(1e3 * x for x in lags)
    row = {**env, "config": ("medusa " + args.tree) if args.medusa else "plain", "streams": args.streams,
           "health_p50_ms": lags_ms[len(lags_ms) // 2], "health_p99_ms": lags_ms[int(0.99 * (len(lags_ms) - 1))],
           "mean_step_ms": 1e3 * step_s, "ttft_ms": [round(1e3 * t, 1) for t in ttfts],
           "ttft_median_steps": statistics.median(ttfts) / step_s, "ttft_max_steps": max(ttfts) / step_s}
    print_table([row], ["config", "streams", "health_p50_ms", "health_p99_ms", "mean_step_ms", "ttft_median_steps",
                        "ttft_max_steps"])
    print("TTFT ms:", row["ttft_ms"])

    def plot(ax, rows):
        ax.bar(range(len(rows[0]["ttft_ms"])), rows[0]["ttft_ms"])
        ax.axhline(rows[0]["mean_step_ms"], color="k", linestyle="--", label="mean engine step")
        ax.set_xlabel("short request")
        ax.set_ylabel("time to first token, ms")
        ax.set_title(f"{rows[0]['config']}, {rows[0]['streams']} long streams, {rows[0]['device']}")
        ax.legend()

    write_results("serve-latency", env, [row], plot)


if __name__ == "__main__":
    main()
