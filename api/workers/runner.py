"""Run one job: claim it, call the core with progress and cancellation, store the outcome.

Invariant: a job this worker claimed leaves `running` through `finish` (succeeded, failed,
cancelled) or `release` (back to queued, when this worker shuts down); if the process dies
first, its lease expires and the reaper settles the job. A heartbeat thread renews the lease
for as long as the job runs, whether or not the core reports progress.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from api.jobs.database import LOSS_POINTS, JobDatabase, JobRecord
from api.jobs.folders import JobFolders
from api.metrics import Metrics
from api.settings import Settings
from compressor.errors import CancelledError, CompressorError, InternalError
from compressor.runtime.progress import ProgressEvent, StopReason
from compressor.vocabulary import (
    CANCELLED,
    FAILED,
    FINETUNING,
    JOB_LOG_ARTIFACT,
    JOB_STAGES,
    SUCCEEDED,
    ErrorCode,
)

log = logging.getLogger("api.worker")

RunJob = Callable[..., Any]  # the signature of compressor.compress
_SETTLE_TRIES = 4


def default_run_job() -> RunJob:
    """Return `compressor.compress` (imported on first use: it brings in torch)."""
    import compressor

    return compressor.compress


def new_worker_id() -> str:
    """Return an id naming this worker process: host, pid and a random suffix."""
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LossCurve:
    """Keep evenly spaced [step, loss] points of a fine-tuning run, at most LOSS_POINTS.

    A point is kept every `stride` steps; when the points fill up, every other one is dropped and
    the stride doubles, so the curve always spans the whole run so far.
    """

    def __init__(self, limit: int = LOSS_POINTS) -> None:
        self.limit = limit
        self.points: list[list[float]] = []
        self.stride = 1
        self.changed = False

    def add(self, step: int, loss: float) -> None:
        """Record the loss at `step` if the step falls on the stride (non-finite losses skipped)."""
        if not math.isfinite(loss) or step % self.stride:
            return
        self.points.append([step, round(loss, 6)])
        self.changed = True
        if len(self.points) > self.limit:
            self.stride *= 2
            self.points = [p for p in self.points if int(p[0]) % self.stride == 0]


class _RunningJob:
    """The mutable state of one run: the lease heartbeat, the stop checks, progress writes."""

    def __init__(
        self, runner: JobRunner, job: JobRecord, worker_id: str
    ) -> None:
        self.runner = runner
        self.job = job
        self.worker_id = worker_id
        self.lost = False  # the store no longer lists this worker as the job's owner
        self.cancelled = False
        self.stage: str | None = None
        self.stage_started = time.monotonic()
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self.losses = LossCurve()
        self._steps = int((job.config.get("finetune") or {}).get("steps") or 0)
        self._done = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat, name=f"heartbeat-{job.id[:8]}", daemon=True
        )

    def __enter__(self) -> _RunningJob:
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._beat.join()
        self._close_stage()

    def _heartbeat(self) -> None:
        settings = self.runner.settings
        while not self._done.wait(settings.heartbeat_s):
            try:
                if not self.runner.store.heartbeat(self.job.id, self.worker_id, settings.lease_s):
                    log.warning("job %s: lost its lease; stopping it", self.job.id)
                    self.lost = True
                    return
            except Exception:  # the store may be briefly unreachable; the lease covers that
                log.exception("job %s: heartbeat failed", self.job.id)

    def should_stop(self) -> bool | StopReason:
        """Return whether the job must stop: True when it is cancelled or lost (another worker
        may own it now: nothing more is written for it), `StopReason.INTERRUPT` when the worker
        shuts down (the job goes back to the queue, and fine-tuning keeps a checkpoint first)."""
        if self.lost:
            return True
        if self.runner.shutting_down.is_set():
            return StopReason.INTERRUPT
        now = time.monotonic()
        if now - self._last_cancel_check >= self.runner.settings.cancel_poll_s:
            self._last_cancel_check = now
            try:
                self.cancelled = self.runner.store.is_cancel_requested(self.job.id)
            except Exception:
                log.exception("job %s: could not read the cancel flag", self.job.id)
        return self.cancelled

    def on_progress(self, event: ProgressEvent) -> None:
        """Store the stage and overall progress: at every stage change, else at most so often."""
        if event.stage not in JOB_STAGES:  # the store (and the API's schema) hold known stages only
            log.warning("job %s: ignoring progress of unknown stage %r", self.job.id, event.stage)
            return
        now = time.monotonic()
        if event.loss is not None and event.stage == FINETUNING and self._steps:
            self.losses.add(round(event.fraction * self._steps), event.loss)
        new_stage = event.stage != self.stage
        if new_stage:
            self._close_stage()
            self.stage, self.stage_started = event.stage, now
        if (not new_stage and event.resumed is None
                and now - self._last_write < self.runner.settings.progress_interval_s):
            return
        self._last_write = now
        curve = self.losses.points if self.losses.changed else None
        try:
            if not self.runner.store.update_progress(
                self.job.id, self.worker_id, event.stage, round(event.overall, 4), curve,
                event.resumed,
            ):
                self.lost = True
            self.losses.changed = False
        except Exception:
            log.exception("job %s: could not store progress", self.job.id)

    def _close_stage(self) -> None:
        if self.stage is not None:
            self.runner.metrics.observe_stage(self.stage, time.monotonic() - self.stage_started)
            self.stage = None


class JobRunner:
    """Run jobs handed over by the queue, one call of `run(job_id)` per job."""

    def __init__(
        self,
        settings: Settings,
        store: JobDatabase,
        files: JobFolders,
        metrics: Metrics,
        requeue: Callable[[str], None],
        run_job: RunJob | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.metrics = metrics
        self.requeue = requeue
        self.run_job = run_job
        self.worker_id = new_worker_id()
        self.shutting_down = threading.Event()

    def run(self, job_id: str) -> None:
        """Claim the job and run it to a finished status (or release it at shutdown)."""
        if self.shutting_down.is_set():
            self.requeue(job_id)  # taken off the queue just as we stopped: put it back
            return
        worker_id = f"{self.worker_id}-{threading.get_native_id()}"
        job = self.store.claim(job_id, worker_id, self.settings.lease_s)
        if job is None:
            log.info("job %s: not queued any more (cancelled, or claimed elsewhere)", job_id)
            return
        log.info("job %s: attempt %d started by %s", job_id, job.attempts, worker_id)
        with _RunningJob(self, job, worker_id) as running:
            outcome = self._execute(running)
        for attempt in range(_SETTLE_TRIES):
            try:
                self._settle(running, *outcome)
                return
            except OperationalError:  # the store blinked; past the last try the reaper takes over
                log.exception("job %s: could not store the outcome (try %d)", job_id, attempt + 1)
                time.sleep(2**attempt)

    def _execute(
        self, running: _RunningJob
    ) -> tuple[str, dict[str, str] | None, dict[str, Any] | None]:
        job = running.job
        # By the names the client sent them as, so that the job's messages name the user's files.
        model_path = self.files.input_as_sent(job.id, "model.pt2")
        data_path = (
            self.files.input_as_sent(job.id, f"data.{job.data_format}") if job.data_format
            else None
        )
        for path in (model_path, data_path):
            if path is not None and not path.is_file():
                return FAILED, _missing_input(path, running.worker_id), None
        run_job = self.run_job or default_run_job()
        try:
            result = run_job(
                model_path,
                job.config,
                out_dir=self.files.fresh_out_dir(job.id),
                data=data_path,
                progress=running.on_progress,
                should_stop=running.should_stop,
            )
        except CompressorError as exc:
            status = CANCELLED if isinstance(exc, CancelledError) else FAILED
            if isinstance(exc, InternalError) and (full := _disk_full(exc)) is not None:
                return FAILED, _no_room_left(full), None
            if isinstance(exc, InternalError):
                log.error("job %s: internal error %s; traceback in its job.log", job.id,
                          exc.error_id)
                self.metrics.count_internal_error()
            return status, {"code": exc.code, "message": exc.message}, None
        except Exception as exc:  # the core turns its own failures into errors; not this one
            if (full := _disk_full(exc)) is not None:
                return FAILED, _no_room_left(full), None
            error = InternalError.wrapping(exc)
            log.exception("job %s: internal error %s", job.id, error.error_id)
            _append_traceback(self.files.job_dir(job.id) / "out" / JOB_LOG_ARTIFACT, exc, error.error_id)
            self.metrics.count_internal_error()
            return FAILED, {"code": error.code, "message": error.message}, None
        return SUCCEEDED, None, json.loads(json.dumps(result.report, default=str))

    def _settle(
        self,
        running: _RunningJob,
        status: str,
        error: dict[str, str] | None,
        report: dict[str, Any] | None,
    ) -> None:
        job = running.job
        if running.lost:
            log.warning("job %s: lost its lease while running; its outcome is discarded", job.id)
            return
        if status == CANCELLED and self.shutting_down.is_set() and not running.cancelled:
            reason = "its worker shut down while running it; re-queued to run again"
            self.store.release(job.id, running.worker_id, reason, self.requeue)
            return
        if status == CANCELLED and error is not None:
            error = {"code": ErrorCode.CANCELLED, "message": "cancelled by its owner while running"}
        artifacts = self.files.describe_artifacts(job.id)
        if self.store.finish(
            job.id, running.worker_id, status, error=error, report=report, artifacts=artifacts
        ):
            self.files.delete_inputs(job.id)
            self.files.delete_kept_products(job.id)
            self.metrics.count_finished(status)
            log.info("job %s: %s%s", job.id, status, f" ({error['code']})" if error else "")
        elif self.store.get(job.id) is None:
            self.files.delete_job(job.id)  # deleted while it ran: leave no files behind


def _append_traceback(path: Path, exc: BaseException, error_id: str) -> None:
    """Add the traceback of `exc`, marked with `error_id`, to the job's log (atomically)."""
    try:
        before = path.read_text() if path.is_file() else ""
        lines = "".join(traceback.format_exception(exc))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{before}traceback of internal error {error_id}:\n{lines}"
                       f"end of traceback {error_id}\n")
        os.replace(tmp, path)
    except OSError:
        log.exception("could not write the traceback of internal error %s to %s", error_id, path)


def _disk_full(exc: BaseException) -> OSError | None:
    """Return the "no space left on device" error that caused `exc`, if one did."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _no_room_left(full: OSError) -> dict[str, str]:
    where = f" writing {Path(full.filename).name}" if isinstance(full.filename, str) else ""
    return {
        "code": ErrorCode.INSUFFICIENT_RESOURCES,
        "message": f"the data directory's disk filled up while the job ran ({full.strerror}"
        f"{where}); the job's artifacts need about twice the upload's size. Delete finished "
        "jobs you no longer need, or give COMPRESSOR_DATA_DIR more space, then submit again",
    }


def _missing_input(path: Path, worker_id: str) -> dict[str, str]:
    return {
        "code": ErrorCode.INPUT_MISSING,
        "message": f"the job's upload is not at {path} on worker {worker_id}: every worker must "
        "share the API's data directory (COMPRESSOR_DATA_DIR); fix the mount and submit again",
    }
