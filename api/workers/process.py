"""A job worker process: run jobs from the queue until SIGTERM or SIGINT, then hand back its job.

`compressor worker` runs `run_worker` in its own process; a `WorkerPool` starts children with
`python -m api.workers.process`, passing the settings as COMPRESSOR_* variables and its own pid
as COMPRESSOR_PARENT_PID: a child whose parent died kills itself like its parent was killed, so
its job is settled by the lease reaper, as for any lost worker. Pooled children leave the lease
reaper and the sweeper to their parent's side (the API runs them); children of `serve` (marked
COMPRESSOR_EMBEDDED_WORKER_PROCESS) lower their CPU priority so the API answers while jobs train.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("api.worker")

PARENT_PID_VARIABLE = "COMPRESSOR_PARENT_PID"
LOG_LEVEL_VARIABLE = "COMPRESSOR_LOG_LEVEL"
EMBEDDED_VARIABLE = "COMPRESSOR_EMBEDDED_WORKER_PROCESS"


def configure_logging(level: str) -> None:
    """Log the service's own messages at `level`; other libraries only from WARNING up."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("api", "compressor", "huey"):
        logging.getLogger(name).setLevel(level.upper())


def _die_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)  # as if killed with the parent: no clean-up
        threading.Event().wait(0.5)


def stop_on_signals() -> threading.Event:
    """Return an event set by SIGTERM or SIGINT (installed before anything slow happens)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_worker(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    metrics_port: int | None = None,
    announce: Callable[[str], None] = log.info,
) -> None:
    """Run one job at a time from the queue (plus the lease reaper) until `stop` is set.

    `stop` defaults to an event set by SIGTERM or SIGINT.
    """
    from api.services import Services
    from api.workers.background import BackgroundWork
    from api.workers.runner import default_run_job

    stop = stop or stop_on_signals()
    parent = os.environ.get(PARENT_PID_VARIABLE)
    if parent:
        threading.Thread(target=_die_with_parent, args=(int(parent),), daemon=True).start()
    default_run_job()  # load torch and the pipeline (seconds) now, not when the first job comes
    if stop.is_set():
        return
    services = Services.open(settings)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=services.metrics.registry)
    background = BackgroundWork(services, concurrency=1, maintenance=not parent)
    background.start()
    announce(f"worker {background.runner.worker_id} (pid {os.getpid()}) waiting for jobs")
    while not stop.wait(1.0):
        pass
    announce(f"worker pid {os.getpid()} stopping: a running job goes back to the queue")
    background.stop()
    services.close()


def main() -> None:
    """Run a worker configured by the environment (how a WorkerPool starts its children)."""
    stop = stop_on_signals()  # first: a pool may stop this process while it is still starting
    from api.settings import Settings

    configure_logging(os.environ.get(LOG_LEVEL_VARIABLE, "info"))
    settings = Settings()
    if os.environ.get(EMBEDDED_VARIABLE) and settings.worker_nice:
        os.nice(settings.worker_nice)  # before torch starts its threads: they inherit it
    run_worker(settings, stop=stop)


if __name__ == "__main__":
    main()
