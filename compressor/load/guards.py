"""The guards a program was exported with: drop the meaningless ones, explain the failing ones.

`torch.export` records the assumptions its graph was traced under as guards (`x.size()[1] <= 128`)
and `ExportedProgram.module()` asserts them on every call. Guards that mention `._base` only say
whether the example input was a view of a larger tensor (exporting from `ids[:2, :64]` yields
`input_ids._base.size()[1] != input_ids.size()[1]`): they constrain how the caller's tensor is
stored, never a value the graph computes, and no fresh tensor can meet them. Those are dropped at
load. Every other guard is kept, checked against the job's inputs before any work starts, and a
failure becomes a `GuardError` naming the input, the guard, and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch.export import ExportedProgram

from compressor.errors import GuardError
from compressor.load.data import Dataset

__all__ = ["check_guards", "drop_aliasing_guards_", "guard_failure"]

_ALIASING = re.compile(r"\._base\b")
_FAILED = "Guard failed: "
_INPUT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[[^\]]*\])*\.(?:size|stride|storage_offset|_base)\b")
_SIZE = re.compile(r"\.size\(\)\[(\d+)\]")


def drop_aliasing_guards_(program: ExportedProgram) -> list[str]:
    """Remove the guards about how the example inputs were stored; return those removed."""
    guards = list(getattr(program, "_guards_code", None) or [])
    dropped = [g for g in guards if _ALIASING.search(g)]
    if dropped:
        program._guards_code = [g for g in guards if not _ALIASING.search(g)]
    return dropped


def check_guards(program: ExportedProgram, data: Dataset, batch_sizes: Iterable[int]) -> None:
    """Check that batches of `data` of each size in `batch_sizes` meet the program's guards.

    Raises `GuardError` for the first guard a batch fails. Guards test shapes, and every row of
    `data` has the same shape, so one batch per size tells for all.
    """
    module = program.module()
    guards = getattr(module, "_guards_fn", None)
    if guards is None:
        return
    names = list(program.graph_signature.user_inputs)
    for size in sorted(set(batch_sizes)):
        batch = data.take(torch.arange(size) % len(data))
        try:
            guards(*[batch[name] for name in names])
        except AssertionError as exc:
            error = guard_failure(exc, f"a batch of {size} sample(s)")
            if error is None:
                raise
            raise error from None


def guard_failure(exc: BaseException, context: str = "the job's inputs") -> GuardError | None:
    """Return the `GuardError` explaining `exc` when it is a failed program guard, else None."""
    text = str(exc)
    if not isinstance(exc, AssertionError) or _FAILED not in text:
        return None
    guard = text.split(_FAILED, 1)[1].strip().splitlines()[0]
    found = _INPUT.search(guard)
    subject = f"input {found.group(1)!r}" if found else "an input"
    dims = {int(d) for d in _SIZE.findall(guard)}
    if dims == {0}:
        advice = (
            "the pipeline runs batches of 1 to 64 samples (more with a larger finetune.batch_size)"
            ": export again with a batch dimension that allows them, e.g. "
            "dynamic_shapes={..: {0: torch.export.Dim('batch')}} without min or max"
        )
    else:
        advice = (
            "export the model again from fresh, contiguous example inputs with that dimension "
            "marked torch.export.Dim.DYNAMIC (or a range that covers your data), or give a data "
            "file whose shapes meet the guard"
        )
    return GuardError(
        f"{subject} does not meet the guard `{guard}` that the program was exported with "
        f"(checked on {context}); {advice}."
    )
