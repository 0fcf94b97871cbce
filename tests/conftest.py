"""Shared test configuration. Helpers live in the `tests.support` package."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After each test (its fixtures torn down), freeze what is still alive.

    A job resets its peak memory at every stage with a full garbage collection
    (`compressor.runtime.memory.release_freed_memory`), which walks every object the process
    holds: in this process that is torch's, sympy's and onnxscript's caches, hundreds of
    thousands of objects, and the walks took about 40 % of a job's time here. Frozen objects
    (`gc.freeze`) are left out of those walks. What is alive between two tests (after a
    collection) is the libraries' state and the module's and session's fixtures, never a test's
    garbage, so nothing a test frees is kept from it.
    """
    yield
    gc.collect()
    gc.freeze()
