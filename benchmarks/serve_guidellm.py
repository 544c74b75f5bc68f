"""guidellm (vLLM's load generator) against `medusa-engine serve`: a plain server and a Medusa
server with back-off, each driven at several concurrencies, one after the other on the same
machine; guidellm's own JSON report per server lands beside the summary.

guidellm is not a dependency of the engine (it pulls its own torch): install it in a venv of its
own and point ``--guidellm`` at its executable.

    python3 -m venv /tmp/gl && /tmp/gl/bin/pip install guidellm==0.8.1
    python benchmarks/serve_guidellm.py --guidellm /tmp/gl/bin/guidellm --concurrency 1 4 8     # CPU
    python benchmarks/serve_guidellm.py --guidellm ... --concurrency 1 16 64 --requests 256      # GPU

Per server and concurrency: output tokens/s (output tokens over guidellm's measured window),
requests/s, TTFT p50 / p99, inter-token latency p50, and the errored requests (must be 0);
``vs_plain``: output tokens/s over the plain server's at that concurrency. guidellm sends its
synthetic prompts (``--prompt-tokens`` in, ``--output-tokens`` out, ignore_eos) to
/v1/chat/completions with streaming and continuous usage stats, as it does against vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, print_table, write_results  # noqa: E402

CONFIGS = {"plain": [], "medusa-backoff": ["--medusa", "--tree", "auto", "--backoff", "--acceptance", "greedy"]}


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the server did not become healthy")


def summarize(report: Path, config: str) -> list[dict]:
    rows = []
    for b in json.loads(report.read_text())["benchmarks"]:
        m, s = b["metrics"], b["scheduler_metrics"]
        window = s["measure_end_time"] - s["measure_start_time"]
        out_tokens = m["output_token_count"]["successful"]["total_sum"]
        ttft = m["time_to_first_token_ms"]["successful"]
        itl = m["inter_token_latency_ms"]["successful"]
        rows.append({"config": config, "concurrency": b["config"]["strategy"]["streams"],
                     "requests": s["requests_made"]["successful"], "errored": s["requests_made"]["errored"],
                     "output_tok_s": round(out_tokens / window, 1),
                     "requests_s": round(s["requests_made"]["successful"] / window, 3),
                     "ttft_p50_ms": round(ttft["median"], 1), "ttft_p99_ms": round(ttft["percentiles"]["p99"], 1),
                     "itl_p50_ms": round(itl["median"], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guidellm", default=shutil.which("guidellm") or "guidellm", help="guidellm's executable")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8041)
    ap.add_argument("--serve-args", default="", help="more `medusa-engine serve` flags, e.g. '--kv-cache-memory-gb 8'")
    args = ap.parse_args()

    from engine.models.loader import resolve_model_path

    tokenizer = resolve_model_path("default")  # guidellm counts the synthetic prompts' tokens with it
    rows, env = [], {}
    for config in args.configs:
        cmd = [sys.executable, "-m", "engine.entrypoints.cli", "serve", "--port", str(args.port),
               "--max-num-seqs", str(max(args.concurrency)), *CONFIGS[config], *args.serve_args.split()]
        log = open(RESULTS / f"guidellm-{config}-server.log.tmp", "w")
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(args.port, server)
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "report.json"
                subprocess.run([args.guidellm, "run",
                                "--backend", f"kind=openai_http,target=http://127.0.0.1:{args.port}",
                                "--profile", f"kind=concurrent,streams={args.concurrency[0]}",
                                "--override", "profile.streams", ",".join(map(str, args.concurrency)),
                                "--constraint", f"kind=max_requests,count={args.requests}",
                                "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                                          f"output_tokens={args.output_tokens}",
                                "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                                "--output", f"kind=json,path={report}", "--disable-console-interactive"],
                               check=True, cwd=tmp)
                rows += summarize(report, config)
                env[f"guidellm_report_{config}"] = json.loads(report.read_text()).get("metadata", {})
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
            log.close()
    for r in rows:
        plain = next((x for x in rows if x["config"] == "plain" and x["concurrency"] == r["concurrency"]), None)
        if plain is not None:
            r["vs_plain"] = round(r["output_tok_s"] / plain["output_tok_s"], 3)
    print_table(rows, list(rows[0]))
    import torch

    from benchmarks.common import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {**environment(device, torch.bfloat16 if device.type == "cuda" else torch.float32, tokenizer.name),
            "tool": "guidellm " + subprocess.run([args.guidellm, "--version"], capture_output=True,
                                                  text=True).stdout.strip().split()[-1],
            "requests": args.requests, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "route": "/v1/chat/completions (streaming)", "serve_args": args.serve_args}

    def plot(ax, rows_):
        for config in args.configs:
            pts = [r for r in rows_ if r["config"] == config]
            ax.plot([r["concurrency"] for r in pts], [r["output_tok_s"] for r in pts], marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (guidellm streams)")
        ax.set_ylabel("output tokens/s")
    print("wrote", write_results("guidellm", info, rows, plot))
    for p in RESULTS.glob("guidellm-*-server.log.tmp"):
        os.remove(p)


if __name__ == "__main__":
    main()
