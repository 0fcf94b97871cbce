"""Hugging Face checkpoints in, Hugging Face checkpoints out.

A job's model may be a Hugging Face folder (`config.json` + `*.safetensors`, a tokenizer beside
it), given as a folder or as a .zip / .tar(.gz) of one. `load_checkpoint` unpacks it safely
inside the job's folder, builds the model from the installed `transformers` and exports it to a
program the pipeline compresses like any `.pt2`; `checkpoint_data` reads the job's data (text
is tokenized by the checkpoint's tokenizer); handing the
compressed dense weights back as a Hugging Face folder is the export stage's
(`compressor.export.huggingface`).

Importing this package is cheap: `transformers` is imported only when a checkpoint is loaded.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from compressor.load.huggingface.archive import archive_kind, extract_archive
from compressor.vocabulary import HF_ARTIFACT

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from compressor.config import DataConfig
    from compressor.load.data import Dataset, InputSpec
    from compressor.load.huggingface.checkpoint import Checkpoint

__all__ = ["HF_ARTIFACT", "LoadedCheckpoint", "checkpoint_data",
           "is_checkpoint", "load_checkpoint"]


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for the pipeline: its program and inputs, and what to hand back."""

    program: ExportedProgram
    specs: list[InputSpec]
    checkpoint: Checkpoint
    # Tokens per sample: `data.max_length`, or the model's own maximum (its position table's
    # rows) when that is fewer: a longer sequence would index past the table.
    max_length: int


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a Hugging Face folder or an archive of one (not a `.pt2` program)."""
    path = Path(path)
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    kind = archive_kind(path)
    if kind in ("tar", "tar.gz"):
        return True
    if kind != "zip":
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = [PurePosixPath(n) for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.name == "config.json" and len(n.parts) <= 2 for n in names)


def load_checkpoint(path: Path, workdir: Path, max_length: int) -> LoadedCheckpoint:
    """Load the checkpoint folder or archive at `path`; unpack archives inside `workdir`.

    The unpacked files are deleted before this returns: the model's weights and the small
    files to hand back (tokenizer, sentence-transformers settings) are then held in memory.
    """
    from compressor.load.huggingface.checkpoint import (
        export_program,
        input_specs,
        most_positions,
        read_checkpoint,
    )

    path = Path(path)
    if path.is_dir():
        checkpoint = read_checkpoint(path)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        unpacked = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=workdir))
        try:
            extract_archive(path, unpacked)
            checkpoint = read_checkpoint(unpacked)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
    max_length = min(max_length, most_positions(checkpoint) or max_length)
    program = export_program(checkpoint, max_length)
    return LoadedCheckpoint(program, input_specs(checkpoint, max_length), checkpoint, max_length)


def checkpoint_data(loaded: LoadedCheckpoint, data: Path | None, config: DataConfig,
                    seed: int) -> Dataset:
    """Return the job's inputs: tokenized text, a tensor file, or sampled token ids."""
    from compressor.load.data import load_data, synthesize_data
    from compressor.load.huggingface.checkpoint import is_causal_lm
    from compressor.load.huggingface.text import TEXT_SUFFIXES, tokenize

    if data is None:
        return synthesize_data(loaded.specs, config.synthetic_samples, seed)
    if Path(data).suffix.lower() in TEXT_SUFFIXES:
        return tokenize(loaded.checkpoint, Path(data), loaded.max_length, config.max_samples,
                        windows=is_causal_lm(loaded.checkpoint))
    return load_data(data, loaded.specs, config.max_samples)
