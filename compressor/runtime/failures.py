"""Recognize the exceptions torch raises for a user's program, and say what to do instead.

The pipeline calls `known_failure(exc)` on any unexpected exception before it reports an internal
error: what is recognized here is a limit of the program, not a bug of the compressor.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from compressor.errors import CompressorError, ResourceError, UnsupportedModelError
from compressor.load.guards import guard_failure

__all__ = ["known_failure"]

_NO_AUTOGRAD = re.compile(r"backward through ([\w.:]+) but no autograd formula")


def known_failure(exc: BaseException) -> CompressorError | None:
    """Return the `CompressorError` that explains `exc`, or None for an unexpected failure."""
    return guard_failure(exc) or _custom_operator_without_gradient(exc) or _disk_full(exc)


def _disk_full(exc: BaseException) -> CompressorError | None:
    """A disk that filled up while the job wrote (its artifacts, what it keeps for a retry, a
    language model's held-out outputs spilled to disk): found anywhere in `exc`'s causes."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            where = (f" writing {Path(cause.filename).name}" if isinstance(cause.filename, str)
                     else "")
            return ResourceError(
                f"the disk filled up while the job ran ({cause.strerror}{where}): free space "
                "on the output folder's disk (or give the job a folder on a larger one) and "
                "run it again")
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _custom_operator_without_gradient(exc: BaseException) -> CompressorError | None:
    found = _NO_AUTOGRAD.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if found is None:
        return None
    return UnsupportedModelError(
        f"the program calls the custom operator {found.group(1)}, which has no autograd formula, "
        "so fine-tuning cannot send gradients through it (and the ONNX exporter has no "
        "translation for it). Write that operation in plain torch code, export the model "
        "again and save the program."
    )
