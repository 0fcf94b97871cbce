"""Fast stand-ins for `compressor.compress`, for tests of the queue, worker and routes.

They honour the same contract (progress events, `should_stop`, atomic artifacts, a `Result`),
so the service cannot tell them apart; end-to-end tests use the real core instead.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from compressor.errors import CancelledError, CompressorError
from compressor.pipeline import Result
from compressor.runtime.progress import STAGES, ProgressEvent, overall_progress


def make_fake_pt2(path: Path) -> Path:
    """Write a small zip: it passes the API's magic-bytes check, not the core's loader."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/version", "1")
    return path


def write_artifacts(out_dir: Path, report: dict[str, Any]) -> Result:
    """Write the three artifacts a job leaves and return the `Result`."""
    out = Path(out_dir)
    (out / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (out / "report.json").write_text(json.dumps(report))
    (out / "job.log").write_text("fake job\n")
    return Result(out, out / "model.onnx", out / "report.json", out / "job.log", report)


class FakeJob:
    """Walk through every stage in about `seconds`, then write artifacts, or raise `error`.

    Records each call's arguments in `calls`; `started` is set when a call begins.
    """

    def __init__(self, seconds: float = 0.0, error: BaseException | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.calls: list[dict[str, Any]] = []
        self.started = threading.Event()

    def __call__(
        self, model: Path, config: Any, *, out_dir: Path, data: Path | None = None,
        progress: Any = None, should_stop: Any = None,
    ) -> Result:
        self.calls.append({"model": Path(model), "config": config, "data": data})
        self.started.set()
        steps = max(1, int(self.seconds / 0.02))
        for stage in STAGES:
            for step in range(steps // len(STAGES) + 1):
                if should_stop is not None and should_stop():
                    raise CancelledError("the job was cancelled")
                if progress is not None:
                    fraction = step / (steps // len(STAGES) + 1)
                    progress(ProgressEvent(stage, fraction, overall_progress(stage, fraction)))
                time.sleep(self.seconds / (steps + len(STAGES)))
        if self.error is not None:
            raise self.error
        return write_artifacts(out_dir, {"fake": True, "config": config})


def failing(code_error: CompressorError) -> FakeJob:
    """Return a fake job that fails with `code_error` after its stages."""
    return FakeJob(0.0, code_error)
