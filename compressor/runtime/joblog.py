"""job.log: a human-readable account of one job, written next to its artifacts as it runs.

While a job runs (`JobLog.capture_library_output`), what the libraries it calls say on their
own goes to its job.log instead of the user's terminal: Python warnings (torch's
FutureWarnings, the ONNX exporter's UserWarnings), the records of the torch, ONNX, transformers
and Hugging Face Hub loggers, and transformers' progress bars (left out). The routing follows
the job's thread (a context variable), so jobs running side by side in one service process
each keep their own lines, and outside a job everything is shown as before. Each distinct
line a library writes is logged the first time only (the exporter repeats the same few on
every export: more than half of a MiniLM target-mode job's log was 3 such lines); how often
each came again is logged when the log closes.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compressor.runtime.memory import PeakMemory, current_rss_bytes, format_bytes

_logger = logging.getLogger("compressor")
# The loggers whose records are the libraries' own noise, with every logger under them.
LIBRARY_LOGGERS = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "transformers",
                   "huggingface_hub")
_current_log: contextvars.ContextVar[JobLog | None] = contextvars.ContextVar(
    "compressor_job_log", default=None)


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
        self._library_repeats: dict[str, int] = {}  # a library's line: the times it came again
        self._file = (io.StringIO() if path is None
                      else open(path, "w", encoding="utf-8"))  # noqa: SIM115 (closed in close())

    def info(self, message: str) -> None:
        """Add a line to the log (and to the `compressor` logger)."""
        _logger.info(message)
        if self._file.closed:
            return
        self._file.write(f"[{time.monotonic() - self._started:8.2f}s] {message}\n")
        self._file.flush()

    def library(self, message: str) -> None:
        """Add a line a library wrote on its own (a warning, a log record) the first time it
        comes; count it when it comes again (`close` says how often)."""
        if message in self._library_repeats:
            self._library_repeats[message] += 1
            return
        self._library_repeats[message] = 0
        self.info(message)

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
        if _current_log.get() is self:
            route_library_output()  # libraries imported by the previous stage
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

    def memory_now(self) -> str:
        """Return the process's memory now, for a line within a stage: resident now, and the
        stage's peak so far."""
        return (f"resident {format_bytes(current_rss_bytes())}, peak of the stage so far "
                f"{format_bytes(self._memory.peak_bytes())}")

    @contextlib.contextmanager
    def capture_library_output(self) -> Iterator[None]:
        """Send the libraries' warnings, log records and progress bars of the enclosed block
        (in this thread) to this log instead of the terminal."""
        route_library_output()
        token = _current_log.set(self)
        try:
            yield
        finally:
            _current_log.reset(token)

    def close(self) -> None:
        """Say which library lines came again and how often, then finish the file (safe to
        call twice)."""
        for message, times in self._library_repeats.items():
            if times:
                self.info(f"came {times} more times, not logged again: {_shortened(message)}")
        self._library_repeats.clear()
        self._file.close()


def _shortened(message: str, most: int = 120) -> str:
    return message if len(message) <= most else message[:most - 1] + "…"


def route_library_output() -> None:
    """Install the routing of library output to the running job's log (idempotent).

    Run at a job's start and at each stage's, so that loggers and hooks of libraries imported
    during the job (transformers, by a Hugging Face checkpoint) are routed from the next stage on.
    """
    if not getattr(warnings.showwarning, "_routes_to_job_log", False):
        warnings.showwarning = _warning_router(warnings.showwarning)
    for logger in [logging.root, *_library_loggers()]:  # records may propagate to the root's
        for handler in logger.handlers:
            if _OUTSIDE_JOBS not in handler.filters and not isinstance(handler, _JobLogHandler):
                handler.addFilter(_OUTSIDE_JOBS)
        # A record reaches the handlers of its logger and of the ancestors it propagates to:
        # one router where propagation stops (or at the library's top) logs it once.
        top = "." not in logger.name
        if logger is not logging.root and (top or not logger.propagate) and not any(
                isinstance(h, _JobLogHandler) for h in logger.handlers):
            logger.addHandler(_JobLogHandler(logging.WARNING))
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and getattr(hf_logging, "_tqdm_hook", None) is None:
        hf_logging.set_tqdm_hook(_quiet_progress_bar)


def _library_loggers() -> list[logging.Logger]:
    names = [name for name in logging.root.manager.loggerDict
             if name.split(".", 1)[0] in LIBRARY_LOGGERS]
    loggers = [logging.getLogger(name) for name in {*names, *LIBRARY_LOGGERS}]
    return [logger for logger in loggers if isinstance(logger, logging.Logger)]


class _OutsideJobs(logging.Filter):
    """Hold back a library's record inside a job (the job's log has it); pass everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (_current_log.get() is None
                or record.name.split(".", 1)[0] not in LIBRARY_LOGGERS)


_OUTSIDE_JOBS = _OutsideJobs()


class _JobLogHandler(logging.Handler):
    """Write a library's record to the log of the job running in this thread, if any.

    Made at WARNING: what would have reached the terminal moves to the job's log, and a
    library's debug records (torch's `__trace` logger emits them whether or not anything
    listens) stay out of it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        log = _current_log.get()
        if log is not None:
            log.library(f"{record.name} {record.levelname.lower()}: {record.getMessage()}")


def _warning_router(show: Callable[..., None]) -> Callable[..., None]:
    """Wrap `warnings.showwarning`: a warning raised in a job goes to its log."""

    def show_in_job_log(message: Warning | str, category: type[Warning], filename: str,
                        lineno: int, file: Any = None, line: str | None = None) -> None:
        log = _current_log.get()
        if log is None or file is not None:
            show(message, category, filename, lineno, file, line)
            return
        log.library(f"{category.__name__}: {message} ({filename}:{lineno})")

    show_in_job_log._routes_to_job_log = True  # type: ignore[attr-defined]
    return show_in_job_log


def _quiet_progress_bar(factory: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: no progress bar inside a job (its stages report progress)."""
    if _current_log.get() is not None:
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)
