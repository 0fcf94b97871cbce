"""job.log: a human-readable account of one job, written next to its artifacts."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

_logger = logging.getLogger("compressor")


class JobLog:
    """Collect timestamped lines and stage timings; `close()` writes job.log atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stage_seconds: dict[str, float] = {}
        self.failed_stage: str | None = None  # the stage an exception left, if any
        self._lines: list[str] = []
        self._started = time.monotonic()
        self._closed = False

    def info(self, message: str) -> None:
        """Add a line to the log (and to the `compressor` logger)."""
        self._lines.append(f"[{time.monotonic() - self._started:8.2f}s] {message}")
        _logger.info(message)

    def traceback(self, exc: BaseException, error_id: str) -> None:
        """Add the full traceback of `exc` to the log, marked with `error_id`."""
        self.info(f"traceback of internal error {error_id}:")
        self._lines.extend(line.rstrip("\n") for line in traceback.format_exception(exc))
        self._lines.append(f"end of traceback {error_id}")
        _logger.info("internal error %s: traceback in %s", error_id, self.path)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage `name` and log its start and end."""
        self.info(f"stage {name}: started")
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.failed_stage = self.failed_stage or name
            raise
        finally:
            elapsed = time.monotonic() - start
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + elapsed
            self.info(f"stage {name}: {elapsed:.2f}s")

    def close(self) -> None:
        """Write the collected lines to `path` via a temp file and a rename (once)."""
        if self._closed:
            return
        self._closed = True
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(self._lines) + "\n")
        os.replace(tmp, self.path)
