"""Verify an exported model: onnxruntime and PyTorch on the same held-out inputs.

Verification runs onnxruntime and the PyTorch model at batch 1 and at a larger batch, and fails
loudly when any output differs by more than `atol + rtol·|torch|`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from compressor.errors import VerificationError
from compressor.load.data import Dataset
from compressor.runtime.outputs import run_outputs

# Output values compared in float64 at a time when an export is verified.
_ELEMENTS_PER_CHUNK = 1 << 22


def onnx_session(path: Path, threads: int | None = None, *,
                 prepack: bool = True) -> ort.InferenceSession:
    """Return an onnxruntime CPU session for the model at `path`.

    `prepack=False` keeps onnxruntime from laying out a second copy of the weights for its
    matrix kernels (half the model's bytes again, measured): slower runs, for checking outputs
    rather than timing them.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run the session on a batch of named torch inputs."""
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.cpu().numpy() for k, v in batch.items() if k in wanted})


@dataclass
class TorchOutputs:
    """The compressed PyTorch model's outputs on the verification samples, computed once, so
    onnxruntime is checked after the PyTorch model has been freed: batch 1, then the rest."""

    batches: list[dict[str, torch.Tensor]]
    outputs: list[list[np.ndarray]]

    @property
    def samples(self) -> int:
        return sum(len(o[0]) if o and o[0].shape else 1 for o in self.outputs)


def torch_outputs(module: nn.Module, held_out: Dataset, max_samples: int = 64,
                  batch_size: int | None = None) -> TorchOutputs:
    """Run `module` on up to `max_samples` held-out rows: at batch 1, then the rest (in batches
    of `batch_size` when given)."""
    rows = torch.arange(min(len(held_out), max_samples))
    rest = rows[1:]
    step = max(1, len(rest) if batch_size is None else batch_size)
    batches = [held_out.take(rows[:1])] + [held_out.take(rest[i:i + step])
                                           for i in range(0, len(rest), step)]
    with torch.no_grad():
        outputs = [[t.numpy() for t in run_outputs(module, batch)] for batch in batches]
    return TorchOutputs(batches, outputs)


def paired_outputs(path: Path, reference: TorchOutputs):
    """Run onnxruntime on the reference batches; yield (output name, PyTorch's value,
    onnxruntime's value) for every output of every batch. Raises `VerificationError` when the
    shapes differ."""
    session = onnx_session(path, prepack=False)
    names = [output.name for output in session.get_outputs()]
    for batch, expected in zip(reference.batches, reference.outputs, strict=True):
        actual = run_onnx(session, batch)
        for name, want, got in zip(names, expected, actual, strict=True):
            if want.shape != got.shape:
                raise VerificationError(
                    f"onnxruntime output {name} has shape {got.shape}, PyTorch {want.shape} "
                    f"(batch {want.shape[0] if want.shape else 1})")
            yield name, want, got


def float64_chunks(want: np.ndarray, got: np.ndarray):
    """Yield both arrays' values as float64, `_ELEMENTS_PER_CHUNK` at a time (a decoder's
    logits are never copied whole)."""
    want, got = want.reshape(-1), got.reshape(-1)
    for start in range(0, want.size, _ELEMENTS_PER_CHUNK):
        stop = start + _ELEMENTS_PER_CHUNK
        yield want[start:stop].astype(np.float64), got[start:stop].astype(np.float64)


def differences(want: np.ndarray, got: np.ndarray, atol: float, rtol: float,
                ) -> tuple[float, float]:
    """Return max |got − want| and the max of |got − want| − (atol + rtol·|want|) (positive:
    out of tolerance), in float64 a chunk at a time (`float64_chunks`). A NaN anywhere makes
    both NaN."""
    worst_abs, worst_excess = 0.0, -np.inf
    for expected, actual in float64_chunks(want, got):
        diff = np.abs(actual - expected)
        excess = diff - (atol + rtol * np.abs(expected))
        # np.maximum, not max(): a NaN must not lose to the figure so far
        worst_abs = float(np.maximum(worst_abs, diff.max(initial=0.0)))
        worst_excess = float(np.maximum(worst_excess, excess.max(initial=-np.inf)))
    return worst_abs, worst_excess


def verify_onnx(path: Path, reference: TorchOutputs, atol: float, rtol: float) -> dict:
    """Check onnxruntime against the PyTorch outputs `reference`; return the parity figures.

    Raises `VerificationError` naming the output and the worst difference on a mismatch.
    """
    worst_abs: dict[str, float] = {}  # output -> max |onnx - torch|
    worst_excess: dict[str, float] = {}  # output -> max of |diff| - (atol + rtol·|torch|)
    for i, want, got in paired_outputs(path, reference):
        batch_abs, batch_excess = differences(want, got, atol, rtol)
        worst_abs[i] = float(np.maximum(worst_abs.get(i, 0.0), batch_abs))
        worst_excess[i] = float(np.maximum(worst_excess.get(i, -np.inf), batch_excess))
    for i, excess in worst_excess.items():
        if excess > 0 or not np.isfinite(worst_abs[i]):
            raise VerificationError(
                f"onnxruntime and PyTorch disagree on output {i}: max |difference| "
                f"{worst_abs[i]:.3g} exceeds atol={atol:g} + rtol={rtol:g}·|value|. The artifact "
                "was not kept; raise export.atol / export.rtol if this precision is acceptable, "
                "or try export.form='dense'")
    return {"passed": True, "samples": reference.samples, "atol": atol, "rtol": rtol,
            "max_abs_diff": worst_abs}


def onnx_outputs(path: Path, dataset: Dataset, batch_size: int = 64) -> list[list[np.ndarray]]:
    """Return onnxruntime's outputs on every batch of `dataset` (batches of `batch_size`)."""
    session = onnx_session(path, prepack=False)
    return [run_onnx(session, batch) for batch in dataset.batches(batch_size)]
