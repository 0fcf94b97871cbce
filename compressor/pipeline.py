"""One compression job, top to bottom: load, plan, rewrite, fine-tune, export, verify, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.config import CompressionConfig
from compressor.progress import ProgressCallback, StopCheck

ARTIFACT_NAMES = ("model.onnx", "report.json", "job.log")


@dataclass(frozen=True)
class Result:
    """What a finished job leaves in `out_dir`."""

    out_dir: Path
    model_path: Path  # out_dir / "model.onnx"
    report_path: Path  # out_dir / "report.json"
    log_path: Path  # out_dir / "job.log"
    report: dict[str, Any]


def compress(
    model: str | Path,
    config: CompressionConfig | dict[str, Any] | str | None = None,
    *,
    out_dir: str | Path,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> Result:
    """Compress the `.pt2` program at `model` and write model.onnx, report.json, job.log.

    `config` is a `CompressionConfig`, a dict or JSON (None: all defaults). `data` is an optional
    .safetensors / .npz file of inputs named after the program's inputs. `progress` receives a
    `ProgressEvent` per update; `should_stop` is polled at every step and a True answer raises
    `CancelledError`. Every failure raises a `CompressorError` subclass with a stable `code`;
    artifacts are written atomically, so `out_dir` never holds a half-written file.
    """
    raise NotImplementedError("being built")  # replaced by the pipeline in this same change
