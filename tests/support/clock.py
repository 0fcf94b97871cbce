"""A job clock the test moves: time budgets tested on behaviour, never on how fast a machine is."""

from __future__ import annotations

import pytest

from compressor.runtime import progress as progress_module
from compressor.runtime.progress import ProgressEvent


class JobClock:
    """Stands in for the job's clock (`compressor.runtime.progress.monotonic`); it moves only
    when `tick` (a `progress` callback) sees an event of `stage` whose message starts with
    `prefix`, by `seconds` each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stage: str, prefix: str,
                 seconds: float) -> None:
        self.now, self.stage, self.prefix, self.seconds = 1000.0, stage, prefix, seconds
        monkeypatch.setattr(progress_module, "monotonic", lambda: self.now)

    def tick(self, event: ProgressEvent) -> None:
        if event.stage == self.stage and event.message.startswith(self.prefix):
            self.now += self.seconds
