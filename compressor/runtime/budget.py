"""A job's time budget (`max_minutes`): what is left of it, and what the stages cut to fit it.

`timeout_s` is a deadline: past it the job fails. `max_minutes` is a budget: the stages that can
trade time for quality (calibration's samples, target mode's search, fine-tuning's steps) stop
early so that the job ends, with a verified artifact, within it. Each keeps `reserve_s` aside
for what must still run after it (export, verification, the report: `finishing_reserve_s`) and
records what it cut (`TimeBudget.cut`), which the report lists under `budget`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# What export, verification and the report are estimated to need: a fixed part (a small model's
# export, onnxruntime sessions, the baseline's export and quantization: MiniLM's took 16-26 s,
# 6-16 s and 7 s on 2 cores), and per GiB of weights (a 4.4 GB decoder: export 132 s,
# verification 91 s, about 50 s a GiB), and the report's latency figures.
FINISHING_FIXED_S = 60.0
FINISHING_PER_GIB_S = 60.0
# The same, once the search has exported a candidate of this model and run an int8 one over the
# held-out split in onnxruntime (`finishing_reserve_after_s`): the original's export, the
# artifact's and its smoothed copy's, and the quantization, in candidate exports; the held-out
# passes (onnxruntime's against PyTorch, the artifact's, the two baselines', int4's slower, and
# the report's latency runs at batch 32), in int8 passes. Gemma-3 270M: export 116 s and
# verification 94 s, a candidate's export 43 s, its held-out 3,182 tokens (the reserve estimated
# from its 1.0 GiB of weights was 128 s). A random-weight BERT-base whose held-out split is 400
# samples: export 57 s, verification 128 s, report 32 s, where the exports alone kept 116 s
# (a candidate's export 10 s, an int8 candidate's held-out pass 22 s).
EXPORTS_PER_FINISHING = 4.0
ONNX_PASSES_PER_FINISHING = 5.0
# Latency figures the report measures at most (batches 1 and 32 of the original, the artifact
# and the baselines), each `export.latency_seconds` long, or longer until each file has
# LATENCY_MIN_RUNS runs, up to LATENCY_LONGEST_MULTIPLE times as long: MiniLM's artifact against
# int8 alone at batch 32 (~135 ms a run) read 137.4 against 136.2 ms with the ~7 runs a second
# gives, a tie, and 132.2 against 140.4 ms with 45 runs each, the runs' middle halves apart.
LATENCY_FIGURES = 8
LATENCY_MIN_RUNS = 40
LATENCY_LONGEST_MULTIPLE = 10


def latency_reserve_s(latency_seconds: float) -> float:
    """Return the longest the report's latency figures can take at `latency_seconds` each."""
    return LATENCY_FIGURES * LATENCY_LONGEST_MULTIPLE * latency_seconds


def finishing_reserve_s(model_bytes: int, latency_seconds: float) -> float:
    """Return the seconds kept for export, verification and the report of a model of
    `model_bytes` whose report spends `latency_seconds` on each latency figure."""
    return (FINISHING_FIXED_S + FINISHING_PER_GIB_S * model_bytes / 2**30
            + latency_reserve_s(latency_seconds))


def finishing_reserve_after_s(export_s: float, onnx_pass_s: float,
                              latency_seconds: float) -> float:
    """Return the seconds kept for export, verification and the report once a candidate of the
    model was measured to export in `export_s`, and an int8 one to run over the held-out split
    in onnxruntime in `onnx_pass_s` (0: not measured yet)."""
    return (FINISHING_FIXED_S + EXPORTS_PER_FINISHING * export_s
            + ONNX_PASSES_PER_FINISHING * onnx_pass_s + latency_reserve_s(latency_seconds))


class TimeBudget:
    """`max_minutes` from `clock()` at construction (None: no budget, nothing is ever cut),
    with `reserve_s` of it kept for what follows the stages that cut (set once the model's
    size is known)."""

    def __init__(self, max_minutes: float | None, clock: Callable[[], float]) -> None:
        self.max_minutes = max_minutes
        self._clock = clock
        self._started = clock()
        self.finishing_s = 0.0  # kept for export, verification and the report
        self._kept_s = 0.0  # kept for a while on top (`keeping`)
        self.cuts: list[str] = []

    @property
    def reserve_s(self) -> float:
        """The seconds kept for what follows: the finishing reserve and what `keeping` adds."""
        return self.finishing_s + self._kept_s

    @reserve_s.setter
    def reserve_s(self, seconds: float) -> None:
        self.finishing_s = seconds

    @property
    def limited(self) -> bool:
        """Whether the job has a budget at all."""
        return self.max_minutes is not None

    def elapsed_s(self) -> float:
        """Return the seconds since the job started."""
        return self._clock() - self._started

    def left_s(self) -> float:
        """Return the seconds of the budget not yet spent, the reserve included (inf: no
        budget; negative: overspent)."""
        if self.max_minutes is None:
            return math.inf
        return self.max_minutes * 60 - self.elapsed_s()

    def affords(self, seconds: float) -> bool:
        """Whether `seconds` more of work still leave the reserve for what follows."""
        return self.left_s() - self.reserve_s >= seconds

    def reserve_at_least(self, seconds: float) -> bool:
        """Keep at least `seconds` for export, verification and the report (never less than
        before); return whether that reserve grew. What `keeping` adds stays on top."""
        if seconds <= self.finishing_s:
            return False
        self.finishing_s = seconds
        return True

    @contextmanager
    def keeping(self, seconds: float) -> Iterator[None]:
        """Keep `seconds` more aside while the block runs, for what may follow it (target mode:
        a finalist shipped untrained should the one in training miss its floor). The finishing
        reserve may grow meanwhile (`reserve_at_least`): this stays on top of it."""
        self._kept_s += seconds
        try:
            yield
        finally:
            self._kept_s -= seconds

    def cut(self, what: str) -> None:
        """Record that a stage did less than it would have, to fit (what the report lists)."""
        self.cuts.append(what)

    def summary(self) -> dict[str, Any]:
        """Return the budget as the report shows it."""
        return {"max_minutes": self.max_minutes, "elapsed_s": round(self.elapsed_s(), 1),
                "reserve_s": round(self.reserve_s, 1), "cut": list(self.cuts)}

    def describe(self) -> str:
        """Return what the budget is, for messages: 'max_minutes 5 (120 s left)'."""
        return f"max_minutes {self.max_minutes:g} ({max(0.0, self.left_s()):.0f} s left)"
