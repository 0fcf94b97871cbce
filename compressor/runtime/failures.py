"""Recognize the exceptions torch raises for a user's program, and say what to do instead.

The pipeline calls `known_failure(exc)` on any unexpected exception before it reports an internal
error: what is recognized here is a limit of the program, not a bug of the compressor.
"""

from __future__ import annotations

import re

from compressor.errors import CompressorError, UnsupportedModelError
from compressor.load.guards import guard_failure

__all__ = ["known_failure"]

_NO_AUTOGRAD = re.compile(r"backward through ([\w.:]+) but no autograd formula")


def known_failure(exc: BaseException) -> CompressorError | None:
    """Return the `CompressorError` that explains `exc`, or None for an unexpected failure."""
    return guard_failure(exc) or _custom_operator_without_gradient(exc)


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
