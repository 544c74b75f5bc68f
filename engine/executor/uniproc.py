"""In-process executor: the driver calls the one Worker directly (no serialisation)."""

from __future__ import annotations

from engine.core.outputs import Drafts, SchedulerOutput, StepResult
from engine.worker.worker import Worker, WorkerInfo, WorkerSpec


class UniprocExecutor:
    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)
        self.info: WorkerInfo = self.worker.info()

    def execute(self, out: SchedulerOutput, defer_candidates: bool = False) -> StepResult:
        """``defer_candidates``: the step may return before its proposals are done
        (``StepResult.candidates_deferred``); ``take_candidates()`` then collects them."""
        return self.worker.execute(out, defer_candidates)

    def take_candidates(self) -> Drafts:
        return self.worker.take_candidates()

    def shutdown(self) -> None:
        pass
