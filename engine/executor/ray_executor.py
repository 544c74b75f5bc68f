"""Ray executor: one actor per tensor-parallel rank, in one placement group.

The driver keeps the scheduler; each step it sends the SchedulerOutput as msgspec bytes to
every rank, every rank runs the same forward (collectives through torch.distributed: NCCL on
CUDA, gloo on CPU) and returns its StepResult bytes. Ranks compute sampling and Medusa
acceptance from identical all-gathered logits; the driver checks that their results are
byte-identical, so a divergence is an error, never a silent wrong answer.

Failures are bounded: a rank that dies or does not answer within ``worker_timeout_s`` raises
WorkerError (the engine fails its in-flight requests), and shutdown() kills every actor and
removes the placement group — and stops Ray only if this executor started it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import msgspec

from engine.core.outputs import ENCODER, SCHEDULER_OUTPUT_DECODER, STEP_RESULT_DECODER, Drafts, SchedulerOutput, StepResult
from engine.executor import WorkerError
from engine.worker.worker import WorkerInfo, WorkerSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class RankActor:
    """Runs inside a Ray actor process: one Worker for one rank."""

    def __init__(self) -> None:
        self.worker = None

    def rendezvous(self) -> tuple[str, int]:
        """An address and a free port on this node for torch.distributed's TCP store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, spec_bytes: bytes, address: str, port: int, timeout_s: float) -> bytes:
        from engine.models.parallel import TPGroup
        from engine.worker.worker import Worker

        spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
        if spec.world_size > 1:
            backend = "nccl" if spec.device.startswith("cuda") else "gloo"
            TPGroup.init_process_group(backend, address, port, spec.rank, spec.world_size, timeout_s)
        self.worker = Worker(spec)
        return ENCODER.encode(self.worker.info())

    def execute(self, out_bytes: bytes) -> bytes:
        return ENCODER.encode(self.worker.execute(SCHEDULER_OUTPUT_DECODER.decode(out_bytes)))


def connect(address: Any) -> bool:
    """Join (address set) or start a Ray runtime; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Workers import the engine from this checkout even when it is not pip-installed.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    except ConnectionError as e:
        raise ValueError(f"ray_address: could not join a Ray cluster at {address!r}: {e}") from None
    return True


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


class RayExecutor:
    def __init__(self, specs: list[WorkerSpec], timeout_s: float, owns_ray: bool) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.timeout_s, self.owns_ray = timeout_s, owns_ray
        self.actors: list[Any] = []
        self.error: WorkerError | None = None
        gpu = specs[0].device.startswith("cuda")
        bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
        self.pg = placement_group([bundle] * len(specs), strategy="PACK")
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
            if not ready:
                raise WorkerError(f"tensor_parallel_size={len(specs)}: Ray could not place {len(specs)} workers "
                                  f"of {bundle} within {timeout_s:.0f} s (cluster has {ray.cluster_resources()})")
            actor_cls = ray.remote(RankActor)
            self.actors = [actor_cls.options(
                num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=i)).remote()
                for i in range(len(specs))]
            address, port = self._gather([self.actors[0].rendezvous.remote()], "rendezvous")[0]
            infos = self._gather([a.start.remote(ENCODER.encode(s), address, port, timeout_s)
                                  for a, s in zip(self.actors, specs)], "worker start-up")
        except BaseException:
            self.shutdown()
            raise
        self.infos = [msgspec.msgpack.decode(b, type=WorkerInfo) for b in infos]
        self.info = self.infos[0]
        if any(i.tree != self.info.tree for i in self.infos):
            self.shutdown()
            raise WorkerError("ranks chose different Medusa trees")

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every ref's value, or WorkerError as soon as one rank fails or time runs out."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                missing = [refs.index(r) for r in pending]
                self.error = WorkerError(f"{what}: rank(s) {missing} gave no answer within {self.timeout_s:.0f} s")
                raise self.error
            try:
                ray.get(ready[0])
            except Exception as e:  # RayActorError (died), RayTaskError (raised), …
                rank = refs.index(ready[0])
                detail = " ".join(str(e).split())[:600]  # Ray's messages span many lines
                self.error = WorkerError(f"{what}: tensor-parallel rank {rank} failed: {type(e).__name__}: {detail}")
                raise self.error from None
        return ray.get(refs)

    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        """Every rank returns its whole result (candidates included): ``defer_candidates`` is an
        in-process saving (engine/worker/model_runner.py), and a result crosses processes as bytes."""
        if self.error is not None:
            raise self.error
        data = ENCODER.encode(out)
        results = self._gather([a.execute.remote(data) for a in self.actors], f"step {out.step_id}")
        if any(r != results[0] for r in results[1:]):
            self.error = WorkerError(f"step {out.step_id}: tensor-parallel ranks returned different results")
            raise self.error
        return STEP_RESULT_DECODER.decode(results[0])

    def take_candidates(self) -> Drafts:
        raise RuntimeError("take_candidates: Ray ranks return their candidates with the step's tokens")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
