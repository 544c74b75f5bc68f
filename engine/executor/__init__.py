"""Executors run the workers (one per tensor-parallel rank) for the driver.

Every executor has ``info`` (a WorkerInfo from rank 0), ``execute(SchedulerOutput,
defer_candidates=False) -> StepResult``, ``take_candidates()`` (for a result with
``candidates_deferred``) and ``shutdown()``. A failing worker surfaces as WorkerError.
"""


class WorkerError(RuntimeError):
    """A worker died, timed out or disagreed with the others; the engine cannot continue."""
