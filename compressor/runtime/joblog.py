"""job.log: a human-readable account of one job, written next to its artifacts as it runs."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from compressor.runtime.memory import PeakMemory, format_bytes

_logger = logging.getLogger("compressor")


class JobLog:
    """Write timestamped lines to `path` as they come (flushed per line); time stages and
    measure each one's peak memory (resident set size of this process).

    The file is started empty when the log is made and grows a whole line at a time, so a
    running job's log can be read (by the service, by `tail -f`) while the job works; `close()`
    ends it. Lines logged after `close()` go to the `compressor` logger only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: lines go to the `compressor` logger only (a library call)
        self.stage_seconds: dict[str, float] = {}
        self.stage_peak_rss_bytes: dict[str, int] = {}
        self._memory = PeakMemory()
        self.failed_stage: str | None = None  # the stage an exception left, if any
        self._started = time.monotonic()
        self._file = (io.StringIO() if path is None
                      else open(path, "w", encoding="utf-8"))  # noqa: SIM115 (closed in close())

    def info(self, message: str) -> None:
        """Add a line to the log (and to the `compressor` logger)."""
        _logger.info(message)
        if self._file.closed:
            return
        self._file.write(f"[{time.monotonic() - self._started:8.2f}s] {message}\n")
        self._file.flush()

    def traceback(self, exc: BaseException, error_id: str) -> None:
        """Add the full traceback of `exc` to the log, marked with `error_id`."""
        self.info(f"traceback of internal error {error_id}:")
        if not self._file.closed:
            self._file.writelines(traceback.format_exception(exc))
            self._file.write(f"end of traceback {error_id}\n")
            self._file.flush()
        _logger.info("internal error %s: traceback in %s", error_id, self.path)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage `name`, measure its peak memory, and log its start
        and end."""
        self.info(f"stage {name}: started")
        self._memory.reset()
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.failed_stage = self.failed_stage or name
            raise
        finally:
            elapsed = time.monotonic() - start
            peak = self._memory.peak_bytes()
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + elapsed
            self.stage_peak_rss_bytes[name] = max(self.stage_peak_rss_bytes.get(name, 0), peak)
            self.info(f"stage {name}: {elapsed:.2f}s, peak memory {format_bytes(peak)}")

    def close(self) -> None:
        """Finish the file (safe to call twice)."""
        self._file.close()
