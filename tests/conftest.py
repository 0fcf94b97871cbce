"""Shared test configuration. Helpers live in the `tests.support` package."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Build onnxscript's list of torchlib functions once per test process, not once per export.

    torch.onnx.export (the exporter `compressor.export.onnx.export_onnx` calls) rebuilds its
    registry at every export from `onnxscript._framework_apis.torch_2_11.get_torchlib_ops()`,
    which re-parses the source of ~500 onnxscript functions each time (~3 s of a tiny model's
    ~10 s job here). The list depends only on the installed onnxscript, so every export gets a
    copy of the first one; the registry torch builds from it, and the exported models, are the
    same.
    """
    try:
        from onnxscript._framework_apis import torch_2_11 as apis
    except ImportError:  # another onnxscript: its exports run as they are
        return
    build = apis.get_torchlib_ops
    built: list[list[object]] = []

    def get_torchlib_ops() -> list[object]:
        if not built:
            built.append(build())
        return list(built[0])

    apis.get_torchlib_ops = get_torchlib_ops


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist (`-n 2` in scripts/test.sh), give each worker's torch one thread.

    torch sizes its intra-op pool to the machine's cores; two workers each running that many
    threads on the same cores only contend (the tests' models are tiny): on 2 cores the whole
    suite took 19 min with torch's default threads and 12.5 min with one per worker.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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
