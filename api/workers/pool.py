"""Run jobs in child processes, one job per process: `serve`'s embedded worker, `worker -c N`.

Why processes: torch.export and the ONNX exporter keep global state and fail when two exports
run at once in one process; a job that crashes or is killed for memory then takes down only its
own process, never the API; and the API's request handling does not share a GIL with training.
Each child is `python -m api.workers.process` with this process's settings. The pool restarts a
child that dies, and stops them all with SIGTERM (their running jobs go back to the queue).
Children write their metrics to a shared directory (prometheus-client's multiprocess mode),
which the parent reports.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from api.settings import Settings
from api.workers.process import EMBEDDED_VARIABLE, LOG_LEVEL_VARIABLE, PARENT_PID_VARIABLE

log = logging.getLogger("api.worker")

_NOT_PASSED = {"api_keys", "host", "port"}  # a worker neither listens nor checks keys


def settings_environment(settings: Settings) -> dict[str, str]:
    """Return the COMPRESSOR_* variables that rebuild `settings` in a worker process."""
    env = {
        f"COMPRESSOR_{name.upper()}": str(value)
        for name, value in settings.model_dump(exclude=_NOT_PASSED).items()
        if value is not None
    }
    env["COMPRESSOR_DATA_DIR"] = str(settings.data_dir.resolve())
    env["COMPRESSOR_STORE_URL"] = settings.resolved_store_url
    env["COMPRESSOR_QUEUE_URL"] = settings.resolved_queue_url
    return env


def worker_threads(settings: Settings, processes: int, embedded: bool) -> int | None:
    """Return the torch (OpenMP) threads each worker process gets, or None to leave the default.

    Beside the API (`embedded`) the workers leave it one core; otherwise N processes split the
    cores (N processes each using every core only fight over them).
    """
    if settings.worker_threads:
        return settings.worker_threads
    cores = os.cpu_count() or 1
    if embedded:
        return max(1, (cores - 1) // max(1, processes))
    return max(1, cores // processes) if processes > 1 else None


class WorkerPool:
    """Keep `processes` worker processes running until `stop()`.

    `embedded`: the pool runs beside the API (`compressor serve`), so its workers yield the CPU
    to it: they lower their priority by `worker_nice` and leave the API a core.
    """

    def __init__(
        self, settings: Settings, processes: int, log_level: str = "info", *, embedded: bool = False
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.metrics_dir = tempfile.mkdtemp(prefix="compressor-worker-metrics-")
        self._env = {
            **os.environ,
            **settings_environment(settings),
            "COMPRESSOR_WORKER_CONCURRENCY": "1",
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            PARENT_PID_VARIABLE: str(os.getpid()),
            LOG_LEVEL_VARIABLE: log_level,
        }
        threads = worker_threads(settings, processes, embedded)
        if threads is not None and ("OMP_NUM_THREADS" not in os.environ or settings.worker_threads):
            self._env["OMP_NUM_THREADS"] = str(threads)
        if embedded:
            self._env[EMBEDDED_VARIABLE] = "1"
        self._children: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "api.workers.process"], env=self._env)

    def start(self) -> None:
        """Start the worker processes and the supervisor that restarts dead ones."""
        self._children = [self._spawn() for _ in range(self.processes)]
        self._supervisor.start()

    def pids(self) -> list[int]:
        """Return the pids of the worker processes now."""
        return [child.pid for child in self._children]

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            for index, child in enumerate(self._children):
                if child.poll() is not None and not self._stopping.is_set():
                    log.warning(
                        "job worker pid %d exited with %s; starting a new one (its job, if any, "
                        "is re-queued when its lease expires)", child.pid, child.returncode,
                    )
                    self._children[index] = self._spawn()

    def stop(self) -> None:
        """SIGTERM every worker, wait for them to hand back their jobs, SIGKILL stragglers."""
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join()
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + 10
        for child in self._children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("job worker pid %d did not stop in time; killing it", child.pid)
                child.kill()
                child.wait()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
