"""Beyond one machine, for real: an API process and two `compressor worker` processes sharing
PostgreSQL, Redis and a data directory run several jobs, none lost and none run twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.jobs.database import JobDatabase
from tests.support.backends import Backend, distributed_backend
from tests.support.processes import ServerProcess, ServiceProcess
from tests.support.service import wait_for_job

pytestmark = [pytest.mark.services, pytest.mark.slow]

KEY = "distributed-test-key-0123"
CONFIG = json.dumps({"ratio": 0.5, "finetune": {"steps": 5}, "export": {"latency_seconds": 0}})
JOBS = 4


@pytest.fixture
def shared(data_dir: Path) -> Iterator[Backend]:
    """Yield a fresh PostgreSQL schema and Redis queue shared by every process of the test."""
    with distributed_backend(data_dir) as backend:
        yield backend


def test_two_workers_run_every_job_exactly_once(shared: Backend, mlp_pt2: Path) -> None:
    env = {**shared.env(), "COMPRESSOR_API_KEYS": KEY}
    logs = shared.data_dir.parent
    api = ServerProcess(env, logs / "api.log", "--workers", "0", api_key=KEY)
    workers = [ServiceProcess(["worker"], env, logs / f"worker-{i}.log") for i in range(2)]
    try:
        api.wait_ready()
        ids = []
        for _ in range(JOBS):
            response = api.client.post(
                "/v1/jobs", files={"model": ("m.pt2", mlp_pt2.read_bytes())},
                data={"config": CONFIG},
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        jobs = [wait_for_job(api.client, job_id, timeout=240) for job_id in ids]
        downloads = [api.client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx") for job_id in ids]
        assert [d.status_code for d in downloads] == [200] * JOBS
        for worker in workers:
            assert worker.stop() == 0, worker.log()
    finally:
        for process in (api, *workers):
            if process.process.poll() is None:
                process.kill()

    assert [(j["status"], j["attempts"]) for j in jobs] == [("succeeded", 1)] * JOBS, [
        j["error"] for j in jobs
    ]
    store = JobDatabase(shared.store_url)
    try:
        records = [store.get(job_id) for job_id in ids]
    finally:
        store.close()
    # A worker id is host-pid-random-thread: the part before the thread names the process.
    processes = {r.worker_id.rsplit("-", 1)[0] for r in records if r and r.worker_id}
    assert len(processes) == 2, "both worker processes should have run jobs"
    worker_logs = "".join(w.log() for w in workers)
    for job_id in ids:
        assert worker_logs.count(f"job {job_id}: attempt 1 started") == 1
        assert worker_logs.count(f"job {job_id}: succeeded") == 1
