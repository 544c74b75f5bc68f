"""The host's share of an engine step: scheduling, applying the tokens, the output processor —
everything around the workers — with the executor replaced by a stand-in that answers at once.

    python -m benchmarks.host_step --batch-sizes 16 64 128 --trees 0 4 63

``--trees adaptive`` runs adaptive trees instead (each sequence its own tree, planned from the
heads' confidences every step, engine/core/adaptive.py), priced by a grid of an H100's order so
that they are chosen as there: the planning and the learning are in the numbers.

Each row runs ``--steps`` decode steps of B sequences (150-token prompts, one candidate accepted
a step) verifying an n-candidate tree (0: plain decoding; n > 0: a tree nested in
mc_sim_7b_63, the full tree's 63 candidates proposed and cut down each step, as back-off runs
it), and reports host milliseconds a step. The stand-in builds the results the runner would
(accepted tokens, the full tree's next candidates), so their cost is in the numbers; the
runner's own host work (packing, result rows) is not. On a GPU the same work runs slower than
on a desktop CPU; compare rows of one run. The collector's heap is frozen while timing, as the
engine does on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, print_table, write_results  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.core.outputs import SeqResult, StepResult  # noqa: E402
from engine.core.policy import SpeculationPolicy  # noqa: E402
from engine.core.adaptive import AdaptiveTrees  # noqa: E402
from engine.core.backoff import LatencyModel, LatencyPoint  # noqa: E402
from engine.spec.tree import nested_subtrees  # noqa: E402

# A latency grid (batch, candidates a sequence, ms) of the order of an H100's for the bundled
# model's ragged steps (benchmarks/profile_step.py --ragged, 2026-12-08: ~1.2 ms, more with
# batch and tokens), so that the adaptive policy here chooses trees as it would there.
H100_GRID = [(b, n, 1.2 + 0.01 * b + 0.002 * b * n) for b in (1, 2, 4, 8, 16, 32, 64, 128)
             for n in (0, 1, 2, 4, 8, 16, 32, 63)]


def adaptive_policy(eng: Engine, subtrees: dict) -> SpeculationPolicy:
    """The engine's tree under adaptive trees priced by ``H100_GRID`` (the start-up grid of a
    CPU would price every tree out)."""
    latency = LatencyModel([LatencyPoint(b, n, ms) for b, n, ms in H100_GRID])
    return SpeculationPolicy(subtrees, adaptive=AdaptiveTrees(eng.tree.parents, eng.tree.depths, latency,
                                                              learning_rate=0.0))


def stand_in_executor(full: int, depth: int, confidence: Optional[list[list[float]]] = None):
    """An executor that accepts one candidate per tree and proposes the full tree's candidates
    (``confidence``: with these head probabilities, one list per sequence in turn, as a ragged
    step reports them for adaptive trees)."""
    def execute(out, defer_candidates=False):  # the candidates come with the tokens
        results = []
        for s in out.seqs:
            if not s.sample:
                results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[]))
                continue
            accepted = min(1, s.tree_size)
            results.append(SeqResult(
                seq_id=s.seq_id, sampled_token_ids=s.candidates[:accepted] + [7],
                next_candidates=[3] * full if out.propose else [], num_accepted=accepted,
                next_confidence=confidence[s.seq_id % len(confidence)] if out.propose and confidence else [],
                accepted_per_depth=[int(accepted > d) for d in range(depth)] if s.tree_size else []))
        return StepResult(step_id=out.step_id, results=results)
    return execute


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--trees", nargs="+", default=["0", "4", "63"],
                    help="candidates per sequence (0: plain decoding; at most 63), or 'adaptive': adaptive "
                         "trees (each sequence its own, the heads' confidences random and fixed, priced by "
                         "a grid of an H100's order)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prefix-caching", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="engines with prefix caching off (0) and / or on (1): its host cost is the difference")
    args = ap.parse_args()
    rows, env = [], None
    for b, caching in [(b, c) for b in args.batch_sizes for c in args.prefix_caching]:
        # (64-token blocks, as on a GPU: prefix caching hashes a block each time one fills.)
        eng = Engine("default", speculative={"heads": "default", "tree": "mc_sim_7b_63"}, max_num_seqs=b,
                     max_num_batched_tokens=64 * b, num_blocks=40 * b, device="cpu", block_size=64,
                     enable_prefix_caching=bool(caching))
        env = env or environment(eng.device, eng.dtype, "SmolLM2-135M-Instruct (stand-in executor)")
        full, depth = eng.policy.full, eng.tree.depth
        sizes = sorted({int(n) for n in args.trees if n != "adaptive" and 0 < int(n) < full})
        subtrees = {n: st.nodes for n, st in nested_subtrees(eng.tree, None, sizes + [full]).items()}
        # One row of head probabilities per sequence (b consecutive ids take each row once, so
        # every configuration of this batch size sees the same ones).
        rng = random.Random(0)
        confidence = [[rng.random() ** 6 for _ in range(full)] for _ in range(b)]
        for n in args.trees:
            if n == "adaptive":
                eng.executor.execute = stand_in_executor(full, depth, confidence)
                eng.scheduler.policy = adaptive_policy(eng, subtrees)
            else:
                # A fixed choice, as back-off's would be: this tree every step, proposals when n > 0.
                eng.executor.execute = stand_in_executor(full, depth)
                policy = SpeculationPolicy(subtrees)
                policy.tree_for = lambda num, budget, path="greedy", n=int(n): n
                policy.propose_next = lambda num, budget, path="greedy", n=int(n): n > 0
                eng.scheduler.policy = policy
            ids = [eng.add_request(list(range(10, 160)), SamplingParams(temperature=0.0, max_tokens=10 ** 6))
                   for _ in range(b)]
            for _ in range(5):  # prefill, first decodes
                eng.step()
            gc.collect()
            gc.freeze()
            nodes = [0]
            execute = eng.executor.execute

            def counted(out, defer_candidates=False, execute=execute):
                nodes[0] += sum(len(s.candidates) for s in out.seqs)
                return execute(out, defer_candidates)

            eng.executor.execute = counted
            try:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    eng.step()
                ms = 1e3 * (time.perf_counter() - t0) / args.steps
            finally:
                gc.unfreeze()
            for r in ids:
                eng.abort(r)
            rows.append({**env, "batch_size": b, "candidates": n, "prefix_caching": bool(caching), "host_ms": ms,
                         "nodes_per_step": nodes[0] / args.steps})
        eng.shutdown()
    print_table(rows, ["batch_size", "candidates", "prefix_caching", "host_ms", "nodes_per_step"])

    def plot(ax, rows):
        for n, caching in [(n, c) for n in args.trees for c in args.prefix_caching]:
            pts = [(r["batch_size"], r["host_ms"]) for r in rows if r["candidates"] == n
                   and r["prefix_caching"] == bool(caching)]
            ax.plot(*zip(*pts), marker="o", label=(f"{n} candidates" if n != "0" else "plain")
                    + (", prefix caching" if caching else ""))
        ax.set_xlabel("decoding sequences")
        ax.set_ylabel("host ms per step")
        ax.set_title(f"host share of an engine step, {env['device']}")
        ax.legend()

    write_results("host-step", env, rows, plot)


if __name__ == "__main__":
    main()
