"""The figures of report.json: sizes, FLOPs, per-layer errors, latency, versions, hashes."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from compressor.export.verify import onnx_session, run_onnx
from compressor.runtime.outputs import OutputFidelity
from compressor.vocabulary import sha256_of as sha256_of  # the artifacts' hashes in the report


def fidelity_dict(fidelity: list[OutputFidelity], names: list[str]) -> dict[str, dict]:
    """Return per-output fidelity as plain data, keyed by ONNX output name."""
    return {name: {k: v for k, v in vars(f).items() if v is not None}
            for name, f in zip(names, fidelity, strict=True)}


def onnx_latency_ms(path: Path, batch: dict[str, torch.Tensor], budget_s: float = 1.0,
                    min_runs: int = 5) -> float:
    """Return the median onnxruntime CPU latency (ms) of one run on `batch` (one file timed
    as `onnx_latencies_ms` times several)."""
    return onnx_latencies_ms({"model": path}, batch, budget_s, min_runs)["model"].median


# onnx_latencies_ms: a file's block of runs a round, and the pause between two files' blocks.
_BLOCK_S = 0.1
_SWITCH_PAUSE_S = 0.01


@dataclass(frozen=True)
class Timing:
    """One ONNX file's onnxruntime latency on one batch: the median and the quartiles (ms) of
    its runs."""

    median: float
    quartiles: tuple[float, float]
    runs: int = 1

    def scaled(self, factor: float) -> Timing:
        """Return this timing with its median and quartiles multiplied by `factor`."""
        return Timing(self.median * factor,
                      (self.quartiles[0] * factor, self.quartiles[1] * factor), self.runs)

    def overlaps(self, other: Timing) -> bool:
        """Whether the two files' middle halves of runs overlap: a difference between their
        medians that is within what the runs of each move by (timing noise, not speed)."""
        return (self.quartiles[0] <= other.quartiles[1]
                and other.quartiles[0] <= self.quartiles[1])


def onnx_latencies_ms(paths: dict[str, Path], batch: dict[str, torch.Tensor],
                      budget_s: float = 1.0, min_runs: int = 5,
                      longest_s: float | None = None) -> dict[str, Timing]:
    """Return each file's onnxruntime CPU latency on `batch`, by the same name as in `paths`.

    The files are timed in turn, a block of runs of each a round (each round starting with the
    next file), so that whatever the machine does meanwhile (another process, the clock's boost)
    weighs on all of them alike: timing one file after another for a second each made the same
    two files 1.09× slower to 1.03× faster than each other from one run to the next. A block
    lasts `_BLOCK_S` (at least one run), and the timing pauses `_SWITCH_PAUSE_S` between blocks:
    onnxruntime's threads spin-wait for more work after a run, and a file timed one run at a
    time right after another measured the digits CNN's artifact 1.8× slower than alone.
    Rounds go on for `budget_s` per file after one warm-up run each, and until each file has
    `min_runs` runs unless that passes `longest_s` per file (twice `budget_s` when None: a
    large model's run can take a minute).
    """
    names = list(paths)
    sessions = {name: onnx_session(paths[name]) for name in names}
    for session in sessions.values():
        run_onnx(session, batch)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    deadline = started + budget_s * len(names)
    cutoff = started + (2 * budget_s if longest_s is None else longest_s) * len(names)
    rounds = 0

    def more() -> bool:
        now = time.perf_counter()
        fewest = min(len(runs) for runs in timings.values())
        return (fewest == 0 or now < deadline
                or (fewest < min_runs and now < cutoff)) and fewest < 1000

    while more():
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            time.sleep(_SWITCH_PAUSE_S)
            block_end = time.perf_counter() + _BLOCK_S
            while True:
                start = time.perf_counter()
                run_onnx(sessions[name], batch)
                timings[name].append((time.perf_counter() - start) * 1000)
                if time.perf_counter() >= block_end:
                    break
        rounds += 1
    return {name: _timing(runs) for name, runs in timings.items()}


def onnx_latencies_in_pairs(bar: str, paths: dict[str, Path], batch: dict[str, torch.Tensor],
                            budget_s: float = 1.0, min_runs: int = 5,
                            longest_s: float | None = None) -> dict[str, Timing]:
    """Return each file's latency as `onnx_latencies_ms` times them, but with two sessions open
    at a time rather than all: each of the others timed in turn with `bar` (its name in
    `paths`), in the order of `paths`, and its timing scaled by `bar`'s median in the first pair
    over `bar`'s median in its own, so that what the machine did between one pair and the next
    weighs out; `bar`'s timing is its first pair's. An onnxruntime session holds about twice
    its file's bytes: four of a 270M-parameter LM's files held 4.7 GiB at once."""
    others = [name for name in paths if name != bar]
    if not others:
        return onnx_latencies_ms(paths, batch, budget_s, min_runs, longest_s)
    timings: dict[str, Timing] = {}
    for name in others:
        pair = onnx_latencies_ms({bar: paths[bar], name: paths[name]}, batch, budget_s,
                                 min_runs, longest_s)
        timings.setdefault(bar, pair[bar])
        timings[name] = pair[name].scaled(timings[bar].median / pair[bar].median)
    return timings


def _timing(runs: list[float]) -> Timing:
    if len(runs) < 2:
        return Timing(runs[0], (runs[0], runs[0]))
    first, _, third = statistics.quantiles(runs, n=4, method="inclusive")
    return Timing(statistics.median(runs), (first, third), len(runs))


def onnx_initializer_numel(path: Path) -> int:
    """Return the number of elements stored as initializers in the ONNX model at `path`."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        total += count
    return total


def versions() -> dict[str, str]:
    """Return the versions of the libraries that shaped the artifact."""
    from compressor import __version__

    return {"compressor": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write `payload` as JSON to `path` via a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
