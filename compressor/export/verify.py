"""Verify an exported model: onnxruntime and PyTorch on the same held-out inputs.

Verification runs onnxruntime and the PyTorch model at batch 1 and at a larger batch, and fails
loudly when an output differs by more than its tolerance: `atol + rtol·|torch|` (the user's
floor, export.atol and export.rtol) plus `noise_multiple` times PyTorch's own float32 noise on
that output. float32 rounding grows with a model's depth and the size of what it sums: a
30-layer language model's logits move by 3.5e-4 between two correct implementations, more than
any fixed tolerance that still catches a wrong weight on a small model. So the noise is measured
on the model itself (`measure_noise`): its float32 outputs against the same model run in float64
on the verified samples, the largest |difference| per output. onnxruntime, a third correct
float32 implementation, lands about as far from float64 as PyTorch does, so within a few times
that noise of PyTorch; a wrong weight or a wrongly exported operator lands far outside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from compressor.errors import VerificationError
from compressor.load.data import Dataset
from compressor.runtime.costs import ACTIVATIONS_PER_MODEL_BYTE, MIN_ACTIVATION_BYTES
from compressor.runtime.memory import tensor_bytes
from compressor.runtime.outputs import run_outputs
from compressor.runtime.spill import SpilledOutputs

# Output values compared in float64 at a time when an export is verified.
_ELEMENTS_PER_CHUNK = 1 << 22
# PyTorch's float32 noise is measured on the verification samples themselves, one at a time,
# while its float64 forward passes cost at most this many FLOPs, and on at least
# `MIN_NOISE_SAMPLES`. One sample's noise says little of another's on a model that amplifies
# rounding: on twelve random 30-layer tanh MLPs, onnxruntime differed from PyTorch by up to 19×
# the noise floor measured on 8 of their 32 samples, by 0.45–2.7× the one measured on all 32.
# A small model is measured on every sample; a 135M-parameter LM at 128 tokens (35 GFLOP a
# sample; 6.6 s in float64 and 3 s in float32 on 2 busy cores) on 2, 6.3M logits each.
NOISE_FLOPS = 10**11
MIN_NOISE_SAMPLES = 2
# How many times PyTorch's float32 noise onnxruntime may differ by (export.noise_multiple's
# default). |onnxruntime − torch32| ≤ |onnxruntime − exact| + |torch32 − exact|, about twice
# the noise when both round alike (those MLPs: 0.45–2.7×); the rest is margin, for the
# samples a large model's noise is not measured on among others.
NOISE_MULTIPLE = 8.0
FLOAT64 = "PyTorch float32 against float64"
PERTURBED = "PyTorch float32 against float32 with every result perturbed by one ulp"
_FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass
class NoiseFloor:
    """PyTorch's own float32 noise on each output: the largest |float32 − reference| over the
    samples measured (0 for an output that is not float)."""

    values: list[float]
    measured_by: str  # FLOAT64 or PERTURBED; "not measured (why)" when `samples` is 0
    samples: int

    @classmethod
    def none(cls, outputs: int, measured_by: str = "not measured") -> NoiseFloor:
        """Return no noise floor for `outputs` outputs (`measured_by` says why)."""
        return cls([0.0] * outputs, measured_by, 0)

    def value(self, i: int) -> float:
        """Return output `i`'s noise floor (0 when it was not measured)."""
        return self.values[i] if i < len(self.values) else 0.0

    def describe(self, i: int) -> str:
        """Say output `i`'s noise floor and how it was measured."""
        if not self.samples:
            return f"PyTorch's float32 noise floor 0 ({self.measured_by})"
        return (f"PyTorch's float32 noise floor {self.values[i]:.3g} ({self.measured_by}, "
                f"max |difference| over {self.samples} held-out sample"
                f"{'s' if self.samples > 1 else ''})")


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
    onnxruntime is checked after the PyTorch model has been freed: batch 1, then the rest (in
    memory, or on disk a batch at a time: `SpilledOutputs`); and the model's own float32 noise
    on each output (`measure_noise`)."""

    batches: list[dict[str, torch.Tensor]]
    outputs: list[list[np.ndarray]] | SpilledOutputs
    noise: NoiseFloor = field(default_factory=lambda: NoiseFloor.none(0))

    @property
    def samples(self) -> int:
        return sum(len(next(iter(batch.values()))) for batch in self.batches)


def torch_outputs(module: nn.Module, held_out: Dataset, max_samples: int = 64,
                  batch_size: int | None = None, noise_flops: int = NOISE_FLOPS,
                  spill: Path | None = None) -> TorchOutputs:
    """Run `module` on up to `max_samples` held-out rows: at batch 1, then the rest (in batches
    of `batch_size` when given); measure its float32 noise on them (`measure_noise`; 0
    `noise_flops`: not measured). With `spill`, the outputs are written in that folder as each
    batch is run (`SpilledOutputs`) rather than held."""
    rows = torch.arange(min(len(held_out), max_samples))
    rest = rows[1:]
    step = max(1, len(rest) if batch_size is None else batch_size)
    batches = [held_out.take(rows[:1])] + [held_out.take(rest[i:i + step])
                                           for i in range(0, len(rest), step)]
    outputs: list[list[np.ndarray]] | SpilledOutputs = [] if spill is None else (
        SpilledOutputs(spill))
    with torch.no_grad():
        for batch in batches:
            outputs.append([t.numpy() for t in run_outputs(module, batch)])
    noise = (measure_noise(module, batches, outputs, noise_flops) if noise_flops
             else NoiseFloor.none(len(outputs[0])))
    return TorchOutputs(batches, outputs, noise)


def measure_noise(module: nn.Module, batches: list[dict[str, torch.Tensor]],
                  outputs: Sequence[list[np.ndarray]], flops: int = NOISE_FLOPS) -> NoiseFloor:
    """Return `module`'s float32 noise on each output: the largest |float32 − reference| over
    the samples of `batches` (whose float32 `outputs` these are), one sample at a time, until
    the reference passes have cost `flops` (at least `MIN_NOISE_SAMPLES` samples).

    The reference is the same model in float64 (`_Float64`: each op's operands are cast as it
    runs, so no float64 copy of the model is made; the largest weight's copy lives for one op).
    Where even that copy does not fit the memory a stage's activations may take, or an op has
    no float64 kernel, the reference is float32 with every op's result perturbed by up to one
    ulp (`_PerturbedRounding`: no copy at all), whose figure measured 0.8–3.7× float64's on
    30-layer MLPs and residual stacks. Where neither runs, nothing is measured: atol and rtol
    alone judge.
    """
    modes = [_Float64, _PerturbedRounding] if _float64_fits(module) else [_PerturbedRounding]
    failures = []
    for mode in modes:
        try:
            values, samples = _largest_differences(module, batches, outputs, flops, mode)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. an op without a float64 kernel
            failures.append(f"{mode.__name__.strip('_')}: {exc}")
            continue
        return NoiseFloor(values, mode.measured_by, samples)
    # atol and rtol alone then judge, and a mismatch's message says why
    return NoiseFloor.none(len(outputs[0]), f"not measured ({'; '.join(failures)})")


def _largest_differences(module: nn.Module, batches: list[dict[str, torch.Tensor]],
                         outputs: Sequence[list[np.ndarray]], flops: int,
                         mode: type[TorchDispatchMode]) -> tuple[list[float], int]:
    """Return max |float32 − reference| per output and the samples it was measured on."""
    worst = [0.0] * len(outputs[0])
    samples, spent, per_sample = 0, 0, 0
    for batch, plain in zip(batches, outputs, strict=True):
        size = len(next(iter(batch.values())))
        for row in range(size):
            if samples >= MIN_NOISE_SAMPLES and spent + per_sample > flops:
                return worst, samples
            sample = {name: value[row:row + 1] for name, value in batch.items()}
            # The first sample's FLOPs stand for every one's (the samples share their shapes).
            counter = FlopCounterMode(display=False) if not samples else contextlib.nullcontext()
            with torch.no_grad(), counter, mode():
                reference = run_outputs(module, sample)
            per_sample = per_sample or int(counter.get_total_flops())
            spent += per_sample
            samples += 1
            with torch.no_grad():
                alone = run_outputs(module, sample)
            # Two float32 op orders against the reference: the sample in its verified batch
            # (for a batch-first output) and alone. On a model that amplifies rounding one
            # order can land close to the reference by chance (a 30-layer MLP's sample: 3.5e-4
            # in its batch, 7.4e-4 alone, onnxruntime 2.7e-3).
            verified = [torch.from_numpy(o[row:row + 1]) if o.ndim and o.shape[0] == size
                        else own for o, own in zip(plain, alone, strict=True)]
            worst = [max(w, _largest_finite_difference(a, r), _largest_finite_difference(b, r))
                     for w, a, b, r in zip(worst, verified, alone, reference, strict=True)]
    return worst, samples


def _largest_finite_difference(plain: torch.Tensor, reference: torch.Tensor) -> float:
    """Return max |plain − reference| over the values where it is finite (0 for an output that
    is not float: ids or a mask have no rounding), in float64 `_ELEMENTS_PER_CHUNK` at a time."""
    if not plain.is_floating_point():
        return 0.0
    worst = 0.0
    for a, b in zip(plain.reshape(-1).split(_ELEMENTS_PER_CHUNK),
                    reference.reshape(-1).split(_ELEMENTS_PER_CHUNK), strict=True):
        diff = (a.double() - b.double()).abs_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        worst = max(worst, float(diff.max()))
    return worst


def _float64_fits(module: nn.Module) -> bool:
    """Whether a float64 copy of `module`'s largest tensor fits what a stage's activations may
    take (`compressor.runtime.costs`). One sample's float64 activations, twice its float32
    ones, stay within what the verification batches took unless those were single samples."""
    tensors = [*module.parameters(), *module.buffers()]
    largest = max((t.numel() for t in tensors if t.is_floating_point()), default=0)
    budget = max(MIN_ACTIVATION_BYTES, ACTIVATIONS_PER_MODEL_BYTE * tensor_bytes(module))
    return largest * 8 <= budget


class _Float64(TorchDispatchMode):
    """Run every op in float64: float32 operands are cast as the op runs, and so are the dtypes
    an op is asked for (a float32 constant, a cast to float32)."""

    measured_by = FLOAT64

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*tree_map(_as_float64, args), **tree_map(_as_float64, kwargs or {}))


def _as_float64(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.double()
    return torch.float64 if value is torch.float32 else value


class _PerturbedRounding(TorchDispatchMode):
    """Run every op as it is, then perturb each new float32 result by a relative amount drawn
    uniformly from ±eps (one ulp; a fixed seed): a second float32 run whose rounding differs
    everywhere, as another implementation's would (stochastic arithmetic). Results that alias
    an operand (views, in-place ops) are left as they are."""

    measured_by = PERTURBED

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return result
        return tree_map(self._perturbed, result)

    def _perturbed(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            return value
        noise = torch.rand(value.shape, generator=self.generator).mul_(2).sub_(1)
        return value * noise.mul_(_FLOAT32_EPS).add_(1)


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


@dataclass
class Worst:
    """Where one output is furthest past its tolerance (or first not finite), and by how much."""

    max_abs: float = 0.0  # max |got − want| over every value
    excess: float = -np.inf  # max of |got − want| − tolerance (positive: out of tolerance)
    index: tuple[int, ...] = ()  # where `excess` is (a non-finite difference wins)
    want: float = 0.0
    got: float = 0.0
    batch: int = 0

    def worse(self, other: Worst) -> Worst:
        """Return the worse of the two, with the larger max |difference|."""
        first = other if _ranks_above(other.excess, self.excess) else self
        return Worst(float(np.maximum(self.max_abs, other.max_abs)), first.excess, first.index,
                     first.want, first.got, first.batch)

    def passed(self) -> bool:
        """Whether every value was finite and within its tolerance."""
        return bool(self.excess <= 0) and bool(np.isfinite(self.max_abs))


def _ranks_above(excess: float, than: float) -> bool:
    return bool(np.isnan(excess) and not np.isnan(than)) or bool(excess > than)


def worst_difference(want: np.ndarray, got: np.ndarray, atol: float, rtol: float,
                     allowance: float = 0.0, batch: int = 0) -> Worst:
    """Return where |got − want| goes furthest past `atol + rtol·|want| + allowance`, in
    float64 a chunk at a time (`float64_chunks`). A NaN or inf anywhere is out of tolerance:
    it makes the max |difference| and the excess NaN (or inf) and marks where it is."""
    worst = Worst(batch=batch)
    offset = 0
    for expected, actual in float64_chunks(want, got):
        diff = np.abs(actual - expected)
        excess = diff - (atol + rtol * np.abs(expected) + allowance)
        if excess.size:
            finite = np.isfinite(excess)
            at = int(np.argmax(excess)) if finite.all() else int(np.argmax(~finite))
            index = tuple(int(i) for i in np.unravel_index(offset + at, want.shape))
            found = Worst(float(diff.max()), float(excess[at]), index, float(expected[at]),
                          float(actual[at]), batch)
            worst = worst.worse(found)
        offset += expected.size
    return worst


def differences(want: np.ndarray, got: np.ndarray, atol: float, rtol: float,
                allowance: float = 0.0) -> tuple[float, float]:
    """Return max |got − want| and the max of |got − want| − (atol + rtol·|want| + allowance)
    (positive: out of tolerance); a NaN anywhere makes both NaN (`worst_difference`)."""
    worst = worst_difference(want, got, atol, rtol, allowance)
    return worst.max_abs, worst.excess


def verify_onnx(path: Path, reference: TorchOutputs, atol: float, rtol: float,
                noise_multiple: float = NOISE_MULTIPLE) -> dict:
    """Check onnxruntime against the PyTorch outputs `reference`; return the parity figures.

    Each output's tolerance is `atol + rtol·|torch| + noise_multiple · reference.noise` (its
    float32 noise floor). Raises `VerificationError` saying which output differs, where, by how
    much, against what tolerance and noise floor, and what to do.
    """
    noise = reference.noise
    worst: dict[str, Worst] = {}  # output name -> its worst value, in the session's order
    batches: dict[str, int] = {}  # output name -> batches compared so far
    for name, want, got in paired_outputs(path, reference):
        i = list(worst).index(name) if name in worst else len(worst)
        allowance = noise_multiple * noise.value(i)
        found = worst_difference(want, got, atol, rtol, allowance, batches.get(name, 0))
        batches[name] = batches.get(name, 0) + 1
        worst[name] = worst[name].worse(found) if name in worst else found
    for i, (name, figures) in enumerate(worst.items()):
        if not figures.passed():
            raise VerificationError(_mismatch(name, figures, atol, rtol, noise_multiple,
                                              noise, i))
    return {"passed": True, "samples": reference.samples, "atol": atol, "rtol": rtol,
            "max_abs_diff": {name: figures.max_abs for name, figures in worst.items()},
            "noise_floor": {name: noise.value(i) for i, name in enumerate(worst)},
            "noise_multiple": noise_multiple, "noise_measured_by": noise.measured_by,
            "noise_samples": noise.samples}


def _mismatch(name: str, worst: Worst, atol: float, rtol: float, noise_multiple: float,
              noise: NoiseFloor, i: int) -> str:
    """Say what differs, where, by how much, against what tolerance, and what to do."""
    where = (f"at batch {worst.batch}, index {worst.index} (PyTorch {worst.want:.6g}, "
             f"onnxruntime {worst.got:.6g})")
    if not np.isfinite(worst.excess):
        return (f"onnxruntime and PyTorch disagree on output {name}: a value is not finite "
                f"{where}. The artifact was not kept. A NaN or inf in onnxruntime's output "
                "alone is an export bug: report it with job.log, or try export.form='dense'; "
                "in PyTorch's too, the model itself overflows on these inputs")
    difference = abs(worst.got - worst.want)
    tolerance = difference - worst.excess
    floor = noise.value(i)
    if not noise.samples or floor == 0:
        verdict = ("No float32 noise allowance applies here (PyTorch's float32 matched float64 "
                   "exactly, or was not compared). If this precision is acceptable, raise "
                   "export.atol / export.rtol, or try export.form='dense'")
    elif difference > 2 * max(noise_multiple, 1) * floor:  # twice what is allowed
        verdict = (f"That is {difference / floor:.3g}× the noise floor, far more than float32 "
                   "rounding explains: onnxruntime computes something else (an operator "
                   "exported wrongly, a weight changed). Report it with job.log, or try "
                   "export.form='dense'")
    else:
        verdict = (f"That is {difference / floor:.3g}× the noise floor, near what float32 "
                   "rounding explains: an operator onnxruntime computes less precisely than "
                   "PyTorch can do this. If this precision is acceptable, raise "
                   "export.noise_multiple (or export.atol / export.rtol)")
    return (f"onnxruntime and PyTorch disagree on output {name}: max |difference| "
            f"{worst.max_abs:.3g}; furthest past its tolerance {where}: |difference| "
            f"{difference:.3g} against {tolerance:.3g} = atol {atol:g} + rtol {rtol:g}·"
            f"|{worst.want:.3g}| + {noise_multiple:g} × {noise.describe(i)}. {verdict}. The "
            "artifact was not kept")


def onnx_outputs(path: Path, dataset: Dataset, batch_size: int = 64) -> list[list[np.ndarray]]:
    """Return onnxruntime's outputs on every batch of `dataset` (batches of `batch_size`)."""
    session = onnx_session(path, prepack=False)
    return [run_onnx(session, batch) for batch in dataset.batches(batch_size)]
