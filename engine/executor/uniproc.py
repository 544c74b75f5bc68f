"""In-process executor: the driver calls the one Worker directly (no serialisation)."""

from __future__ import annotations

from engine.worker import Worker, WorkerInfo, WorkerSpec
from scheduler.outputs import SchedulerOutput, StepResult


class UniprocExecutor:
    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = Worker(spec)
        self.info: WorkerInfo = self.worker.info()

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.worker.execute(out)

    def shutdown(self) -> None:
        pass
