"""WorkerPool: child worker processes share the queue, are replaced when they die, stop cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from api.services import Services
from api.workers.pool import WorkerPool, settings_environment
from compressor.vocabulary import FAILED
from tests.support.processes import REPO_ROOT
from tests.support.service import make_settings
from tests.support.tiny_models import TinyMLP

pytestmark = pytest.mark.slow


@pytest.fixture
def services(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    """Open the embedded services; children find the `api` package from the repo root."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    opened = Services.open(make_settings(data_dir))
    yield opened
    opened.close()


def queue_quick_jobs(services: Services, model: Path, count: int) -> list[str]:
    """Queue `count` jobs whose upload is a state_dict: each fails at once in the worker."""
    ids = []
    for _ in range(count):
        job_id = uuid.uuid4().hex
        target = services.files.input_path(job_id, "model.pt2")
        target.parent.mkdir(parents=True)
        shutil.copy(model, target)
        services.store.create(job_id, "alice", {}, None)
        services.queue.enqueue(job_id)
        ids.append(job_id)
    return ids


def test_settings_reach_the_children_without_keys(services: Services) -> None:
    settings = services.settings.model_copy(update={"api_keys": ["secret-key"]})
    env = settings_environment(settings)
    assert "COMPRESSOR_API_KEYS" not in env and "secret-key" not in str(env)
    assert env["COMPRESSOR_LEASE_S"] == str(settings.lease_s)
    assert env["COMPRESSOR_STORE_URL"] == settings.resolved_store_url


def test_children_share_the_queue_are_replaced_and_stop_cleanly(
    services: Services, tmp_path: Path
) -> None:
    model = tmp_path / "state_dict.pt2"
    torch.save(TinyMLP().state_dict(), model)
    pool = WorkerPool(services.settings, 2)
    pool.start()
    try:
        first_pids = pool.pids()
        ids = queue_quick_jobs(services, model, 6)
        deadline = time.monotonic() + 90
        while any(services.store.get(i).status != FAILED for i in ids):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the pool did not run every job"
            time.sleep(0.1)
        jobs = [services.store.get(i) for i in ids]
        assert {j.error["code"] for j in jobs if j and j.error} == {"invalid_model"}
        assert {int((j.worker_id or "").rsplit("-", 3)[1]) for j in jobs if j} <= set(first_pids)

        os.kill(first_pids[0], signal.SIGKILL)
        os.kill(first_pids[1], signal.SIGTERM)  # a clean exit is replaced too
        deadline = time.monotonic() + 10
        while set(pool.pids()) & set(first_pids):
            assert time.monotonic() < deadline, "the dead workers were not replaced"
            time.sleep(0.1)
        [job_id] = queue_quick_jobs(services, model, 1)  # only the replacements can run it
        deadline = time.monotonic() + 90
        while (job := services.store.get(job_id)) is None or job.status != FAILED:
            assert time.monotonic() < deadline, "the replacement workers run no job"
            time.sleep(0.1)
        assert int((job.worker_id or "").rsplit("-", 3)[1]) in pool.pids()
        time.sleep(1.0)  # both replacements are past their start (the other one idles too)
    finally:
        children = list(pool._children)  # noqa: SLF001 (checking how they exit)
        pool.stop()
    assert [child.returncode for child in children] == [0, 0]
    assert not Path(pool.metrics_dir).exists()
