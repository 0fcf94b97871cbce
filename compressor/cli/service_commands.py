"""`compressor serve` (API + embedded worker, one machine) and `compressor worker` (jobs only).

Both read `COMPRESSOR_*` settings from the environment; options override them. The service
package (`api`, FastAPI, SQLAlchemy, Huey) is imported inside the commands, so that
`import compressor.cli` stays cheap.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click

COMMANDS: list[click.Command] = []


def _load_settings(**overrides: Any) -> Any:
    """Return the settings from the environment with `overrides`; exit 2 with the reason if bad."""
    from pydantic import ValidationError

    from api.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in e['loc']) or 'settings'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise click.UsageError(f"invalid settings:\n{problems}") from None


def _print_settings(title: str, settings: Any) -> None:
    click.echo(title, err=True)
    for name, value in settings.public_summary().items():
        click.echo(f"  {name:<19} {value}", err=True)


def _configure_logging(level: str) -> None:
    """Log the service's own messages at `level`; other libraries only from WARNING up."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("api", "compressor", "huey"):
        logging.getLogger(name).setLevel(level.upper())


@click.command()
@click.option("--host", default=None, help="Interface to bind. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port to listen on. [default: 8000]")
@click.option(
    "--workers", type=click.IntRange(0, 64), default=None,
    help="Jobs the embedded worker runs at once; 0 serves the API only. [default: 1]",
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
    """Run the REST API and an embedded job worker: everything on one machine."""
    settings = _load_settings(
        host=host, port=port, data_dir=data_dir, worker_concurrency=workers,
        embedded_worker=None if workers is None else workers > 0,
    )
    _configure_logging(log_level)
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
    help="Jobs this worker runs at once. [env COMPRESSOR_WORKER_CONCURRENCY; default 1]",
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
    data directory (COMPRESSOR_DATA_DIR, e.g. a network volume).
    """
    settings = _load_settings(worker_concurrency=concurrency)
    _configure_logging(log_level)
    _print_settings("compressor worker", settings)

    from api.services import BackgroundWork, Services

    services = Services.open(settings)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=services.metrics.registry)
    background = BackgroundWork(services, concurrency=max(1, settings.worker_concurrency))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    background.start()
    click.echo(f"worker {background.runner.worker_id} waiting for jobs", err=True)
    while not stop.wait(1.0):
        pass
    click.echo("stopping: running jobs go back to the queue", err=True)
    background.stop()
    services.close()


COMMANDS.extend([serve, worker])
