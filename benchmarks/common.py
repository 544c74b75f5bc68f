"""Shared pieces of the benchmark scripts: held-out prompts, environment facts, JSON + PNG."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from engine.training.data import read_prompts

ROOT = Path(__file__).resolve().parent.parent
# The project's prompt file lies in ../shared; MEDUSA_ENGINE_PROMPTS points elsewhere (the
# device machine gets a held-out extract carried along).
DEFAULT_PROMPTS = Path(os.environ.get("MEDUSA_ENGINE_PROMPTS", ROOT.parent / "shared" / "data" / "train_prompts.jsonl"))
RESULTS = ROOT / "benchmarks" / "results"


def eval_prompts(n: int, path: Path = DEFAULT_PROMPTS, max_chars: int = 600, split: str = "heldout") -> list[str]:
    """The first n prompts of ``split`` (repeated if there are fewer): by default of the
    sources held out of head training, interleaved (engine/training/data.py)."""
    out = []
    for _, prompt in read_prompts(path, split, max_chars):
        out.append(prompt)
        if len(out) == n:
            break
    if len(out) < n:
        out = (out * (n // max(1, len(out)) + 1))[:n]
    return out


@contextlib.contextmanager
def gc_pauses():
    """Yields a dict whose "ms" is, on exit, the wall time Python's garbage collector ran inside
    the block: a pause the engine did not cause shows up as such instead of as a slow step."""
    out = {"ms": 0.0, "collections": 0}
    started = [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            out["ms"] += 1e3 * (time.perf_counter() - started[0])
            out["collections"] += 1
    gc.callbacks.append(callback)
    try:
        yield out
    finally:
        gc.callbacks.remove(callback)


def environment(device: torch.device, dtype: torch.dtype, model: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "model": model,
            "date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__}


def write_results(name: str, env: dict, rows: list[dict], plot) -> Path:
    """rows → results/<name>-<date>.json and a PNG drawn by plot(ax, rows)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{env['date']}-{env['device'].split()[0].lower()}"
    n = 1
    while Path(f"{stem}.json").exists():  # keep earlier runs of the same day (RESULTS.md cites them)
        n += 1
        stem = RESULTS / f"{name}-{env['date']}-{env['device'].split()[0].lower()}-{n}"
    with open(f"{stem}.json", "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot(ax, rows)
    ax.set_title(f"{name}: {env['model']} {env['dtype']} on {env['device']} ({env['date']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=120)
    return Path(f"{stem}.json")


def median_call_ms(fn, iters: int) -> float:
    """The median of ``iters`` calls' times after a warm-up call (CUDA events; wall time without
    a GPU): the machine's host stalls a few calls by up to 2x at times (a 50-call mean moved a
    step's host share 0.12 -> 0.82 ms between two runs); the median is the typical call."""
    fn()
    if not torch.cuda.is_available():  # (profile_step --cpu-dry-run: the same code path)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for e in events[1:]:
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))


def interleaved_median_ms(fns: list, iters: int) -> list[float]:
    """Each callable's median call time (ms) over ``iters`` rounds that call every one of them
    in turn, after a warm-up round; each call is timed alone (CUDA events, then a sync; wall
    time without a GPU). Timed mode after mode, the same step read 1.33 ms in one probe and
    1.56 ms in profile_step (H100, batch 1, 64-node verify): whatever drifts between the
    blocks of calls (clocks, the host, the allocator) lands in a ratio. Interleaved, it lands
    in both sides alike."""
    cuda = torch.cuda.is_available()
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                t.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                t.append(1e3 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def rotated_rounds(runs: dict[str, Callable[[], tuple[float, list]]], repeats: int
                   ) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Every run once a round for ``repeats`` rounds, each round starting one run later (no
    configuration always runs first, or right after the same one): each run's seconds, one a
    round, and the outputs of its last round. A run returns (seconds, outputs)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list] = {}
    names = list(runs)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            dt, outputs[name] = runs[name]()
            seconds[name].append(dt)
    return seconds, outputs


def decode_counts(engine) -> tuple[int, int]:
    """An engine's decode steps and decode tokens so far (``tokens_per_step`` since then)."""
    return engine.stats.num_decode_steps, engine.stats.num_decode_tokens


def tokens_per_step(engine, before: tuple[int, int]) -> float:
    """Decode tokens per decode step since ``decode_counts`` gave ``before``."""
    steps, tokens = decode_counts(engine)
    return round((tokens - before[1]) / max(1, steps - before[0]), 2)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
