"""A rich progress display with one bar per pipeline stage."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from compressor.runtime.progress import STAGES, ProgressEvent


class StageProgress:
    """Show one progress bar per stage; use as a context manager and pass `update` as callback."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[stage]:<11}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(), TextColumn("{task.fields[message]}"), console=console)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, event: ProgressEvent) -> None:
        """Move the bar of `event.stage` (finishing the bars of earlier stages)."""
        for stage in STAGES[: STAGES.index(event.stage)]:
            if stage in self._tasks:
                self._progress.update(self._tasks[stage], completed=1.0)
        if event.stage not in self._tasks:
            self._tasks[event.stage] = self._progress.add_task(
                "", total=1.0, stage=event.stage, message="")
        message = event.message + (f" loss {event.loss:.4g}" if event.loss is not None else "")
        self._progress.update(self._tasks[event.stage], completed=event.fraction, message=message)
