"""Fixtures for the service tests: settings in a temp dir, apps, tiny programs, backends.

Tests marked `services` need the PostgreSQL and Redis servers. They skip with a reason when the
servers are unreachable, except when the `CI` environment variable is set: there a skip is
turned into a failure, so CI always runs them for real.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.backends import Backend, distributed_backend, embedded_backend
from tests.support.fakes import make_fake_pt2
from tests.support.service import make_settings, serve_in_thread


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """In CI, fail a `services` test that would skip: CI must run it against real servers."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and item.get_closest_marker("services"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"services test skipped in CI (CI must run it for real): {reason}"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's COMPRESSOR_* variables out of the tests."""
    for name in list(os.environ):
        if name.startswith("COMPRESSOR_") and not name.startswith("COMPRESSOR_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Return an empty data directory for one test."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def pt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder for the tiny programs, made once per session."""
    return tmp_path_factory.mktemp("pt2")


@pytest.fixture(scope="session")
def mlp_pt2(pt2_dir: Path) -> Path:
    """Return the tiny MLP exported as a real .pt2 program."""
    from tests.support.tiny_models import make_pt2

    return make_pt2("mlp", pt2_dir / "mlp.pt2")


@pytest.fixture(scope="session")
def fake_pt2(pt2_dir: Path) -> Path:
    """Return a small zip that passes the API's file-type check (for fake job functions)."""
    return make_fake_pt2(pt2_dir / "fake.pt2")


@pytest.fixture(params=["embedded", pytest.param("distributed", marks=pytest.mark.services)])
def backend(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Backend]:
    """Yield the embedded (SQLite) and the distributed (PostgreSQL + Redis) backends in turn."""
    factory = embedded_backend if request.param == "embedded" else distributed_backend
    with factory(data_dir) as made:
        yield made


@pytest.fixture
def make_client(data_dir: Path) -> Iterator[Callable[..., httpx.Client]]:
    """Return a factory of apps served on loopback: `make_client(run_job=None, **settings)`."""
    from api.main import create_app

    with ExitStack() as stack:

        def make(run_job: Callable[..., Any] | None = None, **overrides: Any) -> httpx.Client:
            app = create_app(make_settings(data_dir, **overrides), run_job=run_job)
            return stack.enter_context(serve_in_thread(app))

        yield make
