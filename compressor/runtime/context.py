"""What every stage of one job reports to and reads: progress and stopping, the log, a sample's costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.runtime.costs import SampleCosts
from compressor.runtime.joblog import JobLog
from compressor.runtime.progress import JobControl
from compressor.runtime.resume import ResumeFolder


@dataclass
class JobContext:
    """One job's progress reporting and stopping (`control`), its log, and what one sample of
    its model costs (`costs`, which sizes every stage's batches), where it keeps its
    products for a retry (`resume`; None: it keeps none), and a folder for what a stage holds
    on disk rather than in memory until the job ends (`scratch`; None: everything in memory).

    A library call that wants none of the reporting makes one with `JobContext.quiet(costs)`:
    a control that never stops the job and a log that writes no file.
    """

    costs: SampleCosts
    control: JobControl = field(default_factory=JobControl)
    log: JobLog = field(default_factory=lambda: JobLog(None))
    resume: ResumeFolder | None = None
    scratch: Path | None = None

    def reused(self, what: str, at: str | None = None) -> None:
        """Record that this try took `what` from an earlier try's kept products (`at`: where it
        resumed, e.g. "fine-tuning step 4 of 8"), and tell the job's progress (what the
        service shows) where it resumed and all it reused so far (each stage's own log line
        says it in job.log)."""
        if self.resume is None:
            return
        self.resume.reused.append(what)
        self.resume.resumed_at = at or self.resume.resumed_at
        self.control.resumed(self.resume.summary())

    @classmethod
    def quiet(cls, costs: SampleCosts) -> JobContext:
        """Return a context that reports nowhere and never stops."""
        return cls(costs)
