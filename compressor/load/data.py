"""The job's inputs: what the program takes, a data file checked against it, or sampled data.

Every tensor of a `Dataset` has the samples along dim 0 and is named after a program input, in
the program's input order, so a batch feeds `program.module()(**batch)` (or `call_arguments`
for programs exported with positional arguments) and the ONNX model alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sympy
import torch
from torch.export import ExportedProgram

from compressor.errors import DataError, ModelFormatError
from compressor.runtime.outputs import call_arguments

__all__ = [
    "Dataset", "InputSpec", "call_arguments", "input_specs", "load_data", "synthesize_data",
]

DATA_SUFFIXES = (".safetensors", ".npz")
MIN_STD = 1e-3


@dataclass(frozen=True)
class InputSpec:
    """One program input: its name, shape (None where dynamic), dtype and observed values."""

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    low: float | None = None  # min / max of the program's example input
    high: float | None = None
    mean: float | None = None  # floats: mean and std; bools: the rate of True
    std: float | None = None
    example_shape: tuple[int, ...] | None = None  # the example's sizes, for dynamic dims
    batch_max: int | None = None  # the largest batch the program accepts; None: no limit

    def describe_shape(self) -> str:
        """Return the shape for messages, e.g. `(batch, 8)`; other dynamic dims show `*`."""
        dims = ["batch" if i == 0 else "*" if d is None else str(d)
                for i, d in enumerate(self.shape)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def input_specs(program: ExportedProgram) -> list[InputSpec]:
    """Describe the program's user inputs, in order, with statistics of its example inputs."""
    names = list(program.graph_signature.user_inputs)
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    examples = _example_tensors(program, names)
    specs = []
    for name in names:
        value = values.get(name)
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(f"program input {name!r} is not a tensor; it cannot be fed data")
        shape = tuple(None if isinstance(d, torch.SymInt) else int(d) for d in value.shape)
        example = examples.get(name)
        if example is not None and example.dim() == len(shape):
            spec = _spec_from_example(name, shape, value.dtype, example)
        else:
            hints = tuple(_hint(d) for d in value.shape)
            spec = InputSpec(name, shape, value.dtype, example_shape=hints)
        specs.append(replace(spec, batch_max=_batch_max(program, value)))
    return specs


def _batch_max(program: ExportedProgram, value: torch.Tensor) -> int | None:
    """Return the upper bound the program puts on the input's dim 0 (None: unbounded)."""
    size = value.shape[0] if value.dim() else None
    if not isinstance(size, torch.SymInt):
        return None
    bounds = program.range_constraints.get(size.node.expr)
    upper = getattr(bounds, "upper", None)  # int_oo when unbounded, and that is no Integer
    return int(upper) if isinstance(upper, int | sympy.Integer) else None


def _example_tensors(program: ExportedProgram, names: list[str]) -> dict[str, torch.Tensor]:
    if not program.example_inputs:
        return {}
    args, kwargs = program.example_inputs
    found = dict(zip(names, args, strict=False))
    found.update((k, v) for k, v in kwargs.items() if k in names)
    return {k: v.detach() for k, v in found.items() if isinstance(v, torch.Tensor)}


def _hint(size: int | torch.SymInt) -> int:
    hint = size.node.hint if isinstance(size, torch.SymInt) else size
    return int(hint) if isinstance(hint, int) else 1


def _spec_from_example(
    name: str, shape: tuple[int | None, ...], dtype: torch.dtype, example: torch.Tensor
) -> InputSpec:
    example_shape = tuple(example.shape)
    if example.numel() == 0 or dtype.is_complex:
        return InputSpec(name, shape, dtype, example_shape=example_shape)
    values = example.double()
    low, high = values.min().item(), values.max().item()
    if dtype == torch.bool:
        return InputSpec(name, shape, dtype, low, high, values.mean().item(), None, example_shape)
    if not dtype.is_floating_point:
        return InputSpec(name, shape, dtype, low, high, example_shape=example_shape)
    std = values.std().item() if values.numel() > 1 else 0.0
    return InputSpec(name, shape, dtype, low, high, values.mean().item(), std, example_shape)


@dataclass
class Dataset:
    """Input tensors by name, samples along dim 0, in the program's input order."""

    inputs: dict[str, torch.Tensor]
    synthetic: bool  # True when sampled, not read from a file
    source: str  # the file name, or "synthetic"

    def __post_init__(self) -> None:
        counts = {t.shape[0] if t.dim() else None for t in self.inputs.values()}
        if not self.inputs or len(counts) != 1 or None in counts:
            raise ValueError(f"a Dataset needs tensors with one sample count; got {counts}")

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    # Batches are fresh, contiguous tensors, never views of the data set: a program's guards may
    # be about how its inputs are stored, and a fresh tensor is what a caller normally passes.

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the rows at `index` of every input (fresh, contiguous tensors)."""
        return {name: tensor[index].contiguous() for name, tensor in self.inputs.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield consecutive batches in order (fresh, contiguous tensors); the last one may be
        smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {name: t[start : start + batch_size].clone(memory_format=torch.contiguous_format)
                   for name, t in self.inputs.items()}

    def split(self, holdout_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """Shuffle the rows under `seed` and return (train, holdout); both are non-empty."""
        if not 0 < holdout_fraction < 1:
            raise DataError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        n = len(self)
        if n < 2:
            raise DataError(
                f"{self.source}: {n} sample(s) cannot be split into a training and a held-out "
                "part; give at least 2 samples"
            )
        held = min(max(round(n * holdout_fraction), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self._subset(order[held:]), self._subset(order[:held])

    def _subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.take(index), self.synthetic, self.source)


def load_data(path: str | Path, specs: list[InputSpec], max_samples: int) -> Dataset:
    """Read the .safetensors / .npz file at `path`, check it against `specs`, keep `max_samples`.

    Raises `DataError` naming the tensor, what the program expects, what the file holds, and
    what to do.
    """
    path = Path(path)
    tensors = _read_tensors(path)
    expected = [spec.name for spec in specs]
    where = f"data file {path.name}"
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise DataError(
            f"{where} has no tensor for the program's input(s) {missing}; it holds "
            f"{sorted(tensors)}. Name one tensor after each input: {expected} (first "
            "dimension = samples)."
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DataError(
            f"{where} holds tensor(s) {extra} that are not program inputs (the inputs are "
            f"{expected}); remove them or rename them after the inputs."
        )
    scalars = [name for name in expected if tensors[name].dim() == 0]
    if scalars:
        raise DataError(
            f"{where}: tensor(s) {scalars} are scalars; every input needs one row per sample "
            "along the first dimension."
        )
    counts = {name: tensors[name].shape[0] for name in expected}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{where}: the tensors have different sample counts (dim 0): {counts}; every input "
            "needs one row per sample."
        )
    samples = counts[expected[0]]
    if samples < 2:
        raise DataError(
            f"{where} holds {samples} sample(s); at least 2 are needed (some are held out for "
            "evaluation). Add samples along the first dimension."
        )
    if max_samples < 2:
        raise DataError(f"max_samples must be at least 2, got {max_samples}")
    inputs = {spec.name: _conform(where, spec, tensors[spec.name][:max_samples]) for spec in specs}
    return Dataset(inputs, synthetic=False, source=path.name)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(
            f"data file {path.name} has the unknown type {suffix or '(no extension)'!r}; give a "
            ".safetensors or .npz file of tensors named after the program's inputs"
        )
    if not path.is_file():
        raise DataError(f"data file {path.name} not found")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DataError(
                f"data file {path.name} is not a readable .safetensors file ({exc}); write it "
                "with safetensors.torch.save_file({'input_name': tensor, ...}, path)"
            ) from None
    return {name: _from_numpy(path, name, array) for name, array in _read_npz(path).items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    how = "write it with numpy.savez(path, input_name=array, ...) using numeric arrays"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except Exception as exc:  # noqa: BLE001 - zipfile and numpy raise many types for a bad file
        if "allow_pickle" in str(exc):
            raise DataError(
                f"data file {path.name} holds pickled objects (e.g. object arrays), which are "
                f"never loaded; {how}"
            ) from None
        raise DataError(
            f"data file {path.name} is not a readable .npz file ({exc}); {how}"
        ) from None
    raise DataError(f"data file {path.name} is a single .npy array, not an .npz archive; {how}")


def _from_numpy(path: Path, name: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"data file {path.name}: tensor {name!r} has the non-numeric dtype {array.dtype}; "
            "save numbers (integers, floats or booleans)"
        )
    native = array.astype(array.dtype.newbyteorder("="), copy=False)
    return torch.from_numpy(native if native.flags.c_contiguous else native.copy())


def _conform(where: str, spec: InputSpec, tensor: torch.Tensor) -> torch.Tensor:
    """Check one tensor's shape, dtype and values against its spec; return it in spec.dtype."""
    actual = tuple(tensor.shape)
    expected = spec.describe_shape()
    fits = tensor.dim() == len(spec.shape) and all(
        want is None or got == want for got, want in zip(actual[1:], spec.shape[1:], strict=True)
    )
    if not fits:
        raise DataError(
            f"{where}: tensor {spec.name!r} has shape {actual}, but the program's input "
            f"{spec.name!r} is {expected}; save it with that shape (samples first)."
        )
    what = f"{where}: tensor {spec.name!r} holds {_kind(tensor.dtype)} data ({tensor.dtype})"
    if spec.dtype.is_floating_point:
        if tensor.dtype.is_complex:
            raise DataError(f"{what}, but the input is {spec.dtype}; save real numbers.")
        tensor = tensor.to(spec.dtype)
        bad = ~torch.isfinite(tensor)
        if bad.any():
            row = int(bad.reshape(len(tensor), -1).any(1).nonzero()[0])
            raise DataError(
                f"{where}: tensor {spec.name!r} contains {int(bad.sum())} NaN or infinite "
                f"value(s) as {spec.dtype} (first in row {row}); remove or fix those rows."
            )
        return tensor
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        numpy_name = str(spec.dtype).removeprefix("torch.").replace("bool", "bool_")
        raise DataError(
            f"{what}, but the input is {spec.dtype}; save it as "
            f"{'booleans' if spec.dtype == torch.bool else 'integers'} "
            f"(e.g. array.astype(numpy.{numpy_name}))."
        )
    if spec.dtype == torch.bool and tensor.dtype != torch.bool:
        if tensor.numel() and not ((tensor == 0) | (tensor == 1)).all():
            raise DataError(f"{what} with values other than 0 and 1, but the input is bool.")
    elif spec.dtype != torch.bool and tensor.dtype != torch.bool and tensor.numel():
        info = torch.iinfo(spec.dtype)
        low, high = int(tensor.min()), int(tensor.max())
        if low < info.min or high > info.max:
            raise DataError(
                f"{what} in [{low}, {high}], which does not fit the input's {spec.dtype}."
            )
    return tensor.to(spec.dtype)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def synthesize_data(specs: list[InputSpec], samples: int, seed: int) -> Dataset:
    """Sample `samples` rows per input that look like the program's example inputs.

    Floats ~ Normal(mean, std) of the example (N(0, 1) without one); integers uniform over the
    example's [min, max]; bools with the example's rate of True. Deterministic under `seed`.
    """
    if samples < 1:
        raise DataError(f"synthetic data needs at least 1 sample, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    inputs = {spec.name: _sample(spec, samples, generator) for spec in specs}
    return Dataset(inputs, synthetic=True, source="synthetic")


def _sample(spec: InputSpec, samples: int, generator: torch.Generator) -> torch.Tensor:
    sizes = spec.example_shape or ()
    shape = [samples] + [
        d if d is not None else (sizes[i + 1] if i + 1 < len(sizes) else 1)
        for i, d in enumerate(spec.shape[1:])
    ]
    if spec.dtype == torch.bool:
        rate = 0.5 if spec.mean is None else spec.mean
        return torch.rand(shape, generator=generator) < rate
    if spec.dtype.is_floating_point:
        mean = 0.0 if spec.mean is None else spec.mean
        std = 1.0 if spec.std is None else max(spec.std, MIN_STD)
        return (torch.randn(shape, generator=generator) * std + mean).to(spec.dtype)
    if spec.dtype.is_complex:
        raise DataError(
            f"cannot sample values for the complex input {spec.name!r}; give a data file"
        )
    low = 0 if spec.low is None else int(spec.low)
    high = 1 if spec.high is None else int(spec.high)
    values = torch.randint(low, high + 1, shape, generator=generator, dtype=torch.int64)
    return values.to(spec.dtype)
