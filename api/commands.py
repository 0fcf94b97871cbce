"""`compressor serve` (API + embedded worker, one machine) and `compressor worker` (jobs only).

Both read `COMPRESSOR_*` settings from the environment; options override them. The core's CLI
finds them through the `compressor.commands` entry-point group (see pyproject.toml), so the core
never imports the service. The rest of the service (FastAPI, SQLAlchemy, Huey) is imported
inside the commands, so that `import compressor.cli` stays cheap.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from compressor.vocabulary import field_errors


def _load_settings(**overrides: Any) -> Any:
    """Return the settings from the environment with `overrides`; exit 2 with the reason if bad."""
    from pydantic import ValidationError

    from api.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {problem['field']}: {problem['message'].removeprefix('Value error, ')}"
            for problem in field_errors(exc.errors(), whole="settings")
        )
        raise click.UsageError(f"invalid settings:\n{problems}") from None


def _print_settings(title: str, settings: Any) -> None:
    click.echo(title, err=True)
    for name, value in settings.public_summary().items():
        click.echo(f"  {name:<19} {value}", err=True)


@click.command()
@click.option("--host", default=None, help="Interface to bind. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port to listen on. [default: 8000]")
@click.option(
    "--workers", type=click.IntRange(0, 64), default=None,
    help="Job worker processes (one job each); 0 serves the API only. [default: 1]",
)
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Uploads, artifacts and SQLite files. [env COMPRESSOR_DATA_DIR; default ./compressor-data]",
)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(
    host: str | None, port: int | None, workers: int | None, data_dir: Path | None, log_level: str
) -> None:
    """Run the REST API and its job worker processes: everything on one machine."""
    settings = _load_settings(
        host=host, port=port, data_dir=data_dir, worker_concurrency=workers,
        embedded_worker=None if workers is None else workers > 0,
    )
    from api.workers.process import configure_logging

    configure_logging(log_level)
    _print_settings(f"compressor serve on http://{settings.host}:{settings.port}", settings)
    if not settings.api_keys:
        click.echo(
            f"  no API keys configured: serving on loopback ({settings.host}) only. To serve "
            "other machines set COMPRESSOR_API_KEYS and pass --host 0.0.0.0",
            err=True,
        )
    import uvicorn

    from api.main import create_app

    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
        timeout_graceful_shutdown=3, access_log=log_level == "debug",
    )


@click.command()
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=None,
    help="Jobs run at once, each in its own process. [env COMPRESSOR_WORKER_CONCURRENCY; "
    "default 1]",
)
@click.option(
    "--metrics-port", type=int, default=None,
    help="Serve this worker's Prometheus metrics (stage durations) on this port.",
)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def worker(concurrency: int | None, metrics_port: int | None, log_level: str) -> None:
    """Run jobs from the shared queue (Redis) and store (PostgreSQL), e.g. on a GPU machine.

    Every worker and API process must share COMPRESSOR_QUEUE_URL, COMPRESSOR_STORE_URL and the
    data directory (COMPRESSOR_DATA_DIR, e.g. a network volume). Each job runs in a process of
    its own: with --concurrency N above 1 this process supervises N worker processes.
    """
    settings = _load_settings(worker_concurrency=concurrency)
    from api.workers.process import configure_logging, run_worker

    configure_logging(log_level)
    _print_settings("compressor worker", settings)
    if settings.worker_concurrency <= 1:
        run_worker(settings, metrics_port=metrics_port, announce=lambda m: click.echo(m, err=True))
        return
    _run_pool(settings, metrics_port, log_level)


def _run_pool(settings: Any, metrics_port: int | None, log_level: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from api.workers.pool import WorkerPool

    pool = WorkerPool(settings, settings.worker_concurrency, log_level)
    if metrics_port is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=pool.metrics_dir)
        start_http_server(metrics_port, registry=registry)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    pool.start()
    click.echo(f"supervising {pool.processes} worker processes: {pool.pids()}", err=True)
    while not stop.wait(1.0):
        pass
    click.echo("stopping: running jobs go back to the queue", err=True)
    pool.stop()

