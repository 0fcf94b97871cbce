"""How much memory the job uses and how much the machine has, read from the kernel.

- `PeakMemory`: the peak resident set size (RSS) of this process between two points. On Linux
  the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so each
  stage's peak is exact and costs nothing to track; elsewhere the lifetime peak
  (`getrusage`) stands in, which only ever grows.
- `available_memory_bytes`: what a job may still allocate: MemAvailable, capped by the cgroup's
  limit when the process runs in a container.
- `model_memory_estimate`: the peak a job on a model of a given size is expected to reach, and
  `loaded_weight_bytes`: that size, read from the upload without loading it.
- `tensor_bytes`: the bytes a loaded module's tensors hold, each counted once.
- `quantizing_peak_bytes`, `clustering_peak_bytes` and `shortfall`: what onnxruntime's
  quantizers and `share_values`' k-means add to the peak, and whether the machine has it: a
  step that does not fit is left out, or refused, rather than have the kernel kill the job.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import sys
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")
_CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),  # cgroup v2
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
     Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),  # cgroup v1
)

# A job's peak RSS, measured at every stage on Llama decoders of 0.1B, 0.3B and 1.1B parameters
# (benchmarks/README.md, "Billion-parameter models"), is about 2.3 GiB + 1.7 × the weights'
# bytes: 2.5 GiB at 0.1B, 4.6 GiB at 0.3B, 9.5 GiB at 1.1B (the libraries, a batch's logits and
# the held-out outputs do not grow with the weights). The estimate keeps a margin over all three
# (11 % or more); a model whose estimate the machine cannot hold is refused up front.
BASE_PEAK_BYTES = 3 * 1024**3
PEAK_PER_MODEL_BYTE = 2.0
# What onnxruntime's quantizers add to the process's peak RSS, measured one process each on
# Gemma-3 270M's 1.07 GB export (its largest weight the 671 MB tied table) and all-MiniLM-L6-v2's
# 90 MB (a 47 MB table): int8 (`quantize_dynamic`) 4.9 GiB and 401 MiB, the model loaded and
# reloaded shape-inferred with its int8 tensors beside (3.5x the model) and the largest weight's
# float temporaries (2.5x it); int4 (MatMulNBits) 2.5 GiB and 172 MiB (2.5x the model).
_QUANTIZING_PER_MODEL_BYTE = {"int8": 3.5, "int4": 2.5}
_QUANTIZING_PER_LARGEST_BYTE = {"int8": 2.5, "int4": 0.0}
# `share_values`' 1-D k-means over a weight: 5.3x its bytes at its peak, its int64 labels
# included (Gemma-3 270M's 168M-value tied table: 3.3 GiB).
_CLUSTERING_PER_BYTE = 5.5
# Share of the available memory a step plans on; the rest is the allocator's slack.
USABLE_SHARE = 0.9
# Safetensors dtypes a checkpoint is loaded from at twice their size (as float32).
_HALF_DTYPES = frozenset({"F16", "BF16"})
_SAFETENSORS_HEADER_LIMIT = 100 * 1024**2


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Return this process's resident set size now."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


class PeakMemory:
    """The peak RSS of this process since the last `reset()` (or since it started)."""

    def __init__(self) -> None:
        self.exact = self._clear()

    def _clear(self) -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def reset(self) -> None:
        """Start a new measurement period (a no-op where the kernel cannot reset the peak).

        Memory the process freed but the allocator kept is handed back first, so a stage's
        peak is not raised by what an earlier stage left in the allocator's free lists.
        """
        release_freed_memory()
        if self.exact:
            self.exact = self._clear()

    def peak_bytes(self) -> int:
        """Return the peak RSS since `reset()` (the lifetime peak where it cannot be reset)."""
        kib = _status_kib("VmHWM") if self.exact else None
        if kib is not None:
            return kib * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def release_freed_memory() -> None:
    """Return freed heap memory to the kernel: collect garbage, then glibc's `malloc_trim`.

    Tensors below glibc's mmap threshold live on the heap, and freeing them does not lower the
    RSS until the heap is trimmed. A no-op beyond the garbage collection where there is no glibc.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def available_memory_bytes() -> int | None:
    """Return the memory this process may still use: MemAvailable, capped by a cgroup limit.

    None when the machine does not say (not Linux).
    """
    available = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                break
            room = int(limit_text) - int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if room >= 0 and room < (1 << 60):
            available = room if available is None else min(available, room)
        break
    return available


def model_memory_estimate(model_bytes: int) -> int:
    """Return the peak RSS a job on a model of `model_bytes` (float32 weights) should reach."""
    return int(BASE_PEAK_BYTES + PEAK_PER_MODEL_BYTE * model_bytes)


def quantizing_peak_bytes(quantize: str, model_bytes: int, largest_weight_bytes: int) -> int:
    """Return about what onnxruntime's `quantize` ("int8" or "int4") adds to the peak RSS
    quantizing a float32 ONNX model of `model_bytes` whose largest weight has
    `largest_weight_bytes`."""
    return int(_QUANTIZING_PER_MODEL_BYTE[quantize] * model_bytes
               + _QUANTIZING_PER_LARGEST_BYTE[quantize] * largest_weight_bytes)


def clustering_peak_bytes(largest_weight_bytes: int) -> int:
    """Return about what `share_values`' k-means adds to the peak RSS over a model whose
    largest clustered weight has `largest_weight_bytes` (one weight is clustered at a time)."""
    return int(_CLUSTERING_PER_BYTE * largest_weight_bytes)


def shortfall(needed_bytes: int, what: str) -> str | None:
    """Return why `what`, which needs about `needed_bytes` more memory, does not fit in what
    the machine has available (`USABLE_SHARE` of it), or None when it fits or the machine
    does not say."""
    available = available_memory_bytes()
    if available is None or needed_bytes <= USABLE_SHARE * available:
        return None
    return (f"{what} needs about {format_bytes(needed_bytes)} more memory, and "
            f"{format_bytes(available)} is available")


def loaded_weight_bytes(model: Path) -> int:
    """Return about the bytes `model`'s weights take once loaded, without loading it: its
    files' sizes, plus the size again of every float16 and bfloat16 tensor its safetensors
    files list (checkpoints are loaded as float32). `model` is a `.pt2` file, a checkpoint
    folder or a zip of one; only the safetensors headers are read."""
    if model.is_dir():
        files = [path for path in model.rglob("*") if path.is_file()]
        total = sum(path.stat().st_size for path in files)
        for path in files:
            if path.suffix == ".safetensors":
                with path.open("rb") as stream:
                    total += _half_precision_bytes(stream)
        return total
    total = model.stat().st_size
    try:
        with zipfile.ZipFile(model) as archive:
            for member in archive.infolist():
                if member.filename.endswith(".safetensors"):
                    with archive.open(member) as stream:
                        total += _half_precision_bytes(stream)
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError):
        pass  # not a zip, or a damaged one: the loader says what is wrong with it
    return total


def _half_precision_bytes(stream: IO[bytes]) -> int:
    """Return the bytes of the float16 and bfloat16 tensors a safetensors header lists (its
    first 8 bytes give the length of the JSON that follows), or 0 when it is not one."""
    try:
        length = int.from_bytes(stream.read(8), "little")
        if not 0 < length <= _SAFETENSORS_HEADER_LIMIT:
            return 0
        header = json.loads(stream.read(length))
        return sum(int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
                   for name, entry in header.items()
                   if name != "__metadata__" and entry.get("dtype") in _HALF_DTYPES)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, EOFError,
            zipfile.BadZipFile, RuntimeError):
        return 0


def format_bytes(count: float) -> str:
    """Return `count` bytes in the largest binary unit that keeps it ≥ 1 (e.g. '4.1 GiB')."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def tensor_bytes(module: nn.Module) -> int:
    """Return the bytes of `module`'s parameters and buffers (each tensor counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def largest_tensor_bytes(module: nn.Module) -> int:
    """Return the bytes of `module`'s largest parameter or buffer (0 when it has none)."""
    return max((t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())),
               default=0)
