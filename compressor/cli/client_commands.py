"""`compressor submit`, `jobs`, `status`, `cancel`, `download`: talk to a running service.

The server comes from `--server` or `COMPRESSOR_SERVER`, the key from `--api-key` or
`COMPRESSOR_API_KEY`. Job ids go to stdout (so `JOB=$(compressor submit m.pt2)` works);
progress bars and messages go to stderr. Every expected failure exits 1 with the server's
message, never a traceback. httpx and rich are imported inside the commands, so that
`import compressor.cli` stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compressor.cli.job_config import config_options, job_config
from compressor.vocabulary import (
    CANCELLED,
    DEFAULT_SERVER,
    JOB_STATUSES,
    ONNX_ARTIFACT,
    QUEUED,
    RUNNING,
)

if TYPE_CHECKING:
    from rich.console import Console

    from compressor.client import Client, Job

server_option = click.option(
    "--server", envvar="COMPRESSOR_SERVER", default=DEFAULT_SERVER, show_default=True,
    show_envvar=True, help="Base URL of the compressor service.",
)
api_key_option = click.option(
    "--api-key", envvar="COMPRESSOR_API_KEY", default=None, show_envvar=True,
    help="API key, sent as 'Authorization: Bearer KEY'.",
)


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@config_options
@click.option(
    "--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Inputs for calibration and fine-tuning (.safetensors or .npz; .txt or .jsonl text "
    "for a Hugging Face checkpoint).",
)
@server_option
@api_key_option
@click.option("--wait", is_flag=True, help="Follow the job until it finishes.")
@click.option(
    "-o", "--output", type=click.Path(),
    help="Save the compressed model.onnx here (a file, or a folder: existing or ending in /), "
    "with model.onnx.data beside it if the model has its weights there; implies --wait.",
)
def submit(
    model: Path, config_source: str | None, settings: tuple[str, ...], data: Path | None,
    server: str, api_key: str | None, wait: bool, output: str | None,
) -> None:
    """Upload MODEL (a torch.export .pt2, or a Hugging Face model folder or its .zip /
    .tar.gz) as a compression job; print the job id."""
    config = job_config(config_source, settings)
    console = _stderr_console()
    with _client_errors(), _connect(server, api_key) as client:
        job = _upload(client, console, model, config, data)
        click.echo(job.id)
        console.print(f"Submitted job [bold]{job.id}[/] ({job.status}).")
        if not (wait or output):
            console.print(f"Follow it with: compressor status {job.id}")
            return
        job = _follow(client, console, job.id)
        _print_outcome(console, job)
        if output is not None:
            saved = _fetch(client, console, job.id, ONNX_ARTIFACT, output)
            console.print(f"Saved {saved}.")


@click.command("jobs")
@click.option("--status", type=click.Choice(JOB_STATUSES), help="Only jobs in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Show at most this many jobs (newest first).")
@click.option("--json", "as_json", is_flag=True, help="Print one job JSON per line instead.")
@server_option
@api_key_option
def list_jobs(
    status: str | None, limit: int, as_json: bool, server: str, api_key: str | None
) -> None:
    """List your jobs, newest first."""
    with _client_errors(), _connect(server, api_key) as client:
        jobs = list(client.list(status=status, limit=limit))
    if as_json:
        for job in jobs:
            click.echo(json.dumps(job.raw))
        return
    from rich.console import Console
    from rich.table import Table

    # STAGE is where a job is: its stage while it runs, its outcome once finished (a finished
    # job's `stage` is only the last one it ran).
    table = Table("ID", "STATUS", "STAGE", "PROGRESS", "CREATED", "ERROR", box=None)
    table.columns[0].no_wrap = True
    for job in jobs:
        table.add_row(
            job.id, job.status, job.phase, f"{job.progress:.0%}", _when(job.created_at),
            job.error.code if job.error else "",
        )
    Console(width=max(120, Console().width)).print(table if jobs else "No jobs.")


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the job's JSON instead.")
@server_option
@api_key_option
def status(job_id: str, as_json: bool, server: str, api_key: str | None) -> None:
    """Show a job's state, progress, error and a summary of its report."""
    with _client_errors(), _connect(server, api_key) as client:
        job = client.get(job_id)
    if as_json:
        click.echo(json.dumps(job.raw, indent=2))
        return
    rows = [
        ("id", job.id), ("status", job.status), ("stage", job.phase),
        ("progress", f"{job.progress:.0%}"), ("created", _when(job.created_at)),
        ("started", _when(job.started_at)), ("finished", _when(job.finished_at)),
    ]
    if job.resumed:
        rows.append(("resumed", job.resumed))
    if job.error:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    rows += [(f"artifact {a.name}", _size(a.size)) for a in job.artifacts]
    rows += report_summary(job.report)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@click.command()
@click.argument("job_id", metavar="ID")
@server_option
@api_key_option
def cancel(job_id: str, server: str, api_key: str | None) -> None:
    """Cancel a queued or running job."""
    with _client_errors(), _connect(server, api_key) as client:
        job = client.cancel(job_id)
    click.echo(f"Cancel requested for job {job.id}; it is now {job.status}.")


@click.command()
@click.argument("job_id", metavar="ID")
@click.argument("name", default=ONNX_ARTIFACT)
@click.option("-o", "--output", type=click.Path(), default=".", show_default=True,
              help="A file, or a folder (existing or ending in /) to save NAME in.")
@server_option
@api_key_option
def download(job_id: str, name: str, output: str, server: str, api_key: str | None) -> None:
    """Download a job's artifact NAME (model.onnx, report.json, job.log or model-hf.zip),
    sha256-checked. model.onnx comes with its weights file model.onnx.data when the job has one
    (a model past 2 GiB); an interrupted download resumes when run again."""
    console = _stderr_console()
    with _client_errors(), _connect(server, api_key) as client:
        saved = _fetch(client, console, job_id, name, output)
    console.print(f"Saved {saved}.")


COMMANDS: list[click.Command] = [submit, list_jobs, status, cancel, download]


def report_summary(report: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Return the report's headline figures as (label, value): size, fidelity, parity, speed.

    Figures the report lacks are left out, so an older or newer report still summarizes.
    """
    report = report or {}
    rows = []
    headline = (report.get("outcome") or {}).get("headline")
    if headline:
        rows.append(("outcome", headline))
    rows += [("warning", warning) for warning in report.get("warnings") or []]
    weights = report.get("parameters") or {}
    before, after = weights.get("targeted_weights_before"), weights.get("targeted_weights_after")
    if before and after is not None:
        rows.append(("weights kept", f"{after:,} of {before:,} in the compressed layers "
                                     f"({after / before:.0%})"))
    onnx_bytes = report.get("onnx_bytes") or {}
    if "artifact" in onnx_bytes:
        original = onnx_bytes.get("original")
        rows.append(("onnx size", _size(onnx_bytes["artifact"])
                     + (f" (original {_size(original)})" if original else "")))
    for output, figures in ((report.get("fidelity") or {}).get("final") or {}).items():
        parts = [f"{name} {figures[key]:.4g}" for key, name in
                 (("cosine", "cosine"), ("relative_l2", "rel. L2"), ("top1_agreement", "top-1"),
                  ("next_token_agreement", "next-token top-1"), ("kl_divergence", "KL"))
                 if isinstance(figures.get(key), int | float)]
        rows.append((f"fidelity {output}", ", ".join(parts)))
        shipped = ((report.get("fidelity") or {}).get("artifact") or {}).get(output, figures)
        if isinstance(shipped.get("perplexity"), int | float):
            rows.append((f"perplexity {output}", f"{shipped['perplexity']:.4g} (original "
                                                 f"{figures['original_perplexity']:.4g})"))
    parity = report.get("onnx_parity") or {}
    if "passed" in parity:
        worst = max((parity.get("max_abs_diff") or {}).values(), default=None)
        rows.append(("onnx parity", ("passed" if parity["passed"] else "FAILED")
                     + (f", max abs diff {worst:.2g}" if worst is not None else "")))
    latency = report.get("latency") or {}
    original, compressed = (latency.get(k, {}).get("batch_1_ms") for k in ("original", "compressed"))
    if original and compressed:
        rows.append(("latency batch 1", f"{compressed:.3g} ms (original {original:.3g} ms)"))
    if (report.get("data") or {}).get("synthetic"):
        rows.append(("data", "synthetic inputs (no data file was given)"))
    return rows


# --- helpers ----------------------------------------------------------------------------------


@contextmanager
def _client_errors() -> Iterator[None]:
    """Turn the client's errors into `Error: <message>` and exit status 1."""
    from compressor.client import AuthError, ClientError, RateLimitedError

    try:
        yield
    except AuthError as exc:
        raise click.ClickException(
            f"{exc.message} (HTTP {exc.status_code}; pass --api-key or set COMPRESSOR_API_KEY "
            "to a key the server knows)"
        ) from None
    except RateLimitedError as exc:
        after = f" in {exc.retry_after:g} s" if exc.retry_after else " once one finishes"
        raise click.ClickException(f"{exc.message} (too many jobs in flight: retry{after})") \
            from None
    except ClientError as exc:
        raise click.ClickException(exc.message) from None


def _connect(server: str, api_key: str | None) -> Client:
    from compressor.client import Client

    return Client(server, api_key=api_key)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _transfer_bar(console: Console) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console,
    )


def _upload(client: Client, console: Console, model: Path, config: dict[str, Any] | None,
            data: Path | None) -> Job:
    with _transfer_bar(console) as bar:
        task = bar.add_task(f"Uploading {model.name}", total=None)
        return client.submit(
            model, config, data,
            on_upload=lambda sent, total: bar.update(task, completed=sent, total=total),
        )


def _follow(client: Client, console: Console, job_id: str) -> Job:
    """Show the job's stage and progress until it finishes; Ctrl-C stops watching only."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<22}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(QUEUED, total=1.0)

            def show(job: Job) -> None:
                label = job.status if job.status != RUNNING else (job.stage or RUNNING)
                bar.update(task, description=label, completed=job.progress)

            return client.wait(job_id, on_update=show)
    except KeyboardInterrupt:
        console.print(
            f"Stopped watching; job {job_id} goes on on the server. "
            f"See it with: compressor status {job_id}, stop it with: compressor cancel {job_id}"
        )
        raise click.exceptions.Exit(130) from None


def _print_outcome(console: Console, job: Job) -> None:
    if job.status == CANCELLED:
        raise click.ClickException(f"job {job.id} was cancelled")
    seconds = ""
    if job.started_at and job.finished_at:
        seconds = f" in {(job.finished_at - job.started_at).total_seconds():.1f} s"
    console.print(f"Job {job.id} succeeded{seconds}.")
    for label, value in report_summary(job.report):
        console.print(f"  {label}: {value}")


def _fetch(client: Client, console: Console, job_id: str, name: str, dest: str) -> Path:
    with _transfer_bar(console) as bar:
        task = bar.add_task(f"Downloading {name}", total=None)
        return client.download(
            job_id, name, dest,
            on_progress=lambda got, total: bar.update(task, completed=got, total=total or None),
        )


def _when(moment: Any) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size < 1024:
        return f"{size} B"
    scaled = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GiB":
            return f"{scaled:.1f} {unit}"
    raise AssertionError("unreachable: the loop returns at GiB")
