"""Progress reporting and cooperative stopping, shared by the pipeline, the CLI and the service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from time import monotonic

from compressor.errors import CancelledError, InterruptedJobError, JobTimeoutError
from compressor.runtime.budget import TimeBudget
from compressor.vocabulary import JOB_STAGES as STAGES

# Share of the whole job each stage stands for, used to turn stage fractions into `overall`.
_STAGE_WEIGHTS = {
    "loading": 0.05,
    "calibrating": 0.08,
    "planning": 0.10,
    "rewriting": 0.08,
    "finetuning": 0.47,
    "exporting": 0.12,
    "verifying": 0.05,
    "reporting": 0.05,
}


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update: the stage, how far it is (0..1), and the whole job's progress."""

    stage: str
    fraction: float
    overall: float
    message: str = ""
    loss: float | None = None
    # Set when this try of the job took products an earlier try kept: where it resumed and what
    # it reused ("resumed at fine-tuning step 4 of 8; reused: decompositions (2 of 2 layers),
    # ..."), growing as each stage reuses more.
    resumed: str | None = None


class StopReason(Enum):
    """What a `should_stop` answer other than False means: the job is abandoned (`CANCEL`,
    what True means too), or stopped to be run again (`INTERRUPT`: a worker shutting down),
    when fine-tuning first keeps a checkpoint of the step it reached."""

    CANCEL = "cancel"
    INTERRUPT = "interrupt"


ProgressCallback = Callable[[ProgressEvent], None]
StopCheck = Callable[[], "bool | StopReason"]


def overall_progress(stage: str, fraction: float) -> float:
    """Return the whole job's progress (0..1) when `stage` is `fraction` done."""
    done = 0.0
    for name in STAGES:
        if name == stage:
            return min(1.0, done + _STAGE_WEIGHTS[name] * max(0.0, min(1.0, fraction)))
        done += _STAGE_WEIGHTS[name]
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


class JobControl:
    """Report progress and stop the job when it is cancelled or past its deadline.

    `check()` is called at every step boundary (every fine-tuning step, every stage); it raises
    `CancelledError` once `should_stop()` answers True (or `StopReason.CANCEL`),
    `InterruptedJobError` once it answers `StopReason.INTERRUPT`, and `JobTimeoutError` once
    `timeout_s` has passed since the control was made. `budget` is the job's `max_minutes`
    from the same moment, on the same clock (`monotonic`, this module's: tests replace it).
    """

    def __init__(
        self,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        timeout_s: float | None = None,
        max_minutes: float | None = None,
    ) -> None:
        self._progress = progress
        self._should_stop = should_stop
        self._timeout_s = timeout_s
        self.budget = TimeBudget(max_minutes, _now)
        self._last = ProgressEvent(STAGES[0], 0.0, 0.0)

    def check(self) -> None:
        """Raise if the job was cancelled or ran past its timeout."""
        answer = self._should_stop() if self._should_stop is not None else False
        if answer is StopReason.INTERRUPT:
            raise InterruptedJobError("the job was stopped to be run again; what it made so far "
                                      "is kept for the retry")
        if answer:
            raise CancelledError("the job was cancelled")
        if self._timeout_s is not None and self.budget.elapsed_s() > self._timeout_s:
            raise JobTimeoutError(
                f"the job ran past its timeout_s={self._timeout_s:g} s; raise `timeout_s` in the "
                "config, lower `finetune.steps`, or give `max_minutes` (below timeout_s) for the "
                "best model the job can make in that time"
            )

    def report(
        self, stage: str, fraction: float, message: str = "", loss: float | None = None
    ) -> None:
        """Send a progress event for `stage` (if anyone listens) and check for a stop."""
        self._last = ProgressEvent(stage, fraction, overall_progress(stage, fraction), message,
                                   loss)
        if self._progress is not None:
            self._progress(self._last)
        self.check()

    def resumed(self, summary: str) -> None:
        """Send where the job resumed and what it reused (`ProgressEvent.resumed`), at the stage
        and progress last reported."""
        if self._progress is not None:
            self._progress(replace(self._last, message=summary, loss=None, resumed=summary))


def _now() -> float:
    """Return the job's clock, in seconds (looked up at each call, so a test can replace it)."""
    return monotonic()
