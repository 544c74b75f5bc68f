"""In-process executor: the driver calls the one ModelRunner directly."""

from __future__ import annotations

from engine.model_runner import ModelRunner
from scheduler.outputs import SchedulerOutput, StepResult


class UniprocExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.runner.execute(out)

    def shutdown(self) -> None:
        pass
