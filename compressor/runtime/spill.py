"""Outputs kept on disk a batch at a time, for what is too large to hold whole (a language
model's logits over a held-out split)."""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class SpilledOutputs(Sequence):
    """Outputs kept on disk, a batch at a time: `append` writes a batch's outputs as `.npy`
    files in `folder`, indexing reads one batch back. What verification compares for a decoder
    (64 samples × 128 positions × 49,152 logits: 1.6 GB in float32) is then never held whole."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.counts: list[int] = []  # outputs per batch

    def append(self, outputs: list[np.ndarray]) -> None:
        """Write one batch's outputs after the ones written so far."""
        for i, output in enumerate(outputs):
            np.save(self._path(len(self.counts), i), output, allow_pickle=False)
        self.counts.append(len(outputs))

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, batch: int) -> list[np.ndarray]:
        if not -len(self) <= batch < len(self):
            raise IndexError(batch)
        batch %= len(self)
        return [np.load(self._path(batch, i)) for i in range(self.counts[batch])]

    def _path(self, batch: int, output: int) -> Path:
        return self.folder / f"batch{batch}_output{output}.npy"


class SpilledTensors(Sequence):
    """A batch-by-batch list of torch outputs kept on disk (`SpilledOutputs`) in a folder of
    its own made in `parent`, removed once neither this nor a view of it (`on`) is left; items
    come back on `device`."""

    def __init__(self, parent: Path, device: torch.device | str = "cpu") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="outputs-", dir=parent))
        self._outputs = SpilledOutputs(self.folder)  # shared by every view
        weakref.finalize(self._outputs, shutil.rmtree, self.folder, ignore_errors=True)
        self.device = torch.device(device)

    def append(self, outputs: list[torch.Tensor]) -> None:
        """Write one batch's outputs after the ones written so far."""
        self._outputs.append([t.detach().cpu().numpy() for t in outputs])

    def on(self, device: torch.device) -> SpilledTensors:
        """Return a view of the same files whose items come back on `device`."""
        view = copy.copy(self)
        view.device = torch.device(device)
        return view

    def __len__(self) -> int:
        return len(self._outputs)

    def __getitem__(self, batch: int) -> list[torch.Tensor]:
        return [torch.from_numpy(a).to(self.device) for a in self._outputs[batch]]
