"""Chaos on PostgreSQL + Redis: worker processes SIGKILLed at random points while 30 jobs run,
and queue messages lost between a worker taking them and starting the job. Every job must end in
exactly one final state, through the lease reaper and the lost-message sweeper."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.jobs.queue import JobQueue
from tests.support.backends import Backend, distributed_backend
from tests.support.processes import ServerProcess, ServiceProcess

pytestmark = [pytest.mark.services, pytest.mark.slow]

KEY = "chaos-test-key-0123456789"
JOBS = 30
REAL_JOBS = 12  # the rest upload a state_dict: refused at load, so they run and end in a blink
LOST_MESSAGES = 3
CONFIG = json.dumps({
    "ratio": 0.5, "finetune": {"steps": 3, "eval_every": 3}, "export": {"latency_seconds": 0},
    "data": {"synthetic_samples": 16},
})
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def shared(data_dir: Path) -> Iterator[Backend]:
    """Yield a fresh PostgreSQL schema and Redis queue shared by every process of the test."""
    with distributed_backend(data_dir) as backend:
        yield backend


def test_workers_killed_at_random_leave_every_job_final_exactly_once(
    shared: Backend, mlp_pt2: Path, tmp_path: Path
) -> None:
    import torch

    from tests.support.tiny_models import TinyMLP

    state_dict = tmp_path / "state_dict.pt2"
    torch.save(TinyMLP().state_dict(), state_dict)
    rng = random.Random(12)
    env = {
        **shared.env(), "COMPRESSOR_API_KEYS": KEY, "COMPRESSOR_MAX_ATTEMPTS": "10",
        "COMPRESSOR_REQUEUE_AFTER_S": "2", "COMPRESSOR_MAX_JOBS_IN_FLIGHT": str(JOBS),
    }
    logs = shared.data_dir.parent
    api = ServerProcess(env, logs / "api.log", "--workers", "0", api_key=KEY)
    started = 0

    def start_worker() -> ServiceProcess:
        nonlocal started
        started += 1
        return ServiceProcess(["worker"], env, logs / f"worker-{started}.log")

    workers = [start_worker(), start_worker()]
    kills = 0
    try:
        api.wait_ready(path="/healthz")
        models = [mlp_pt2.read_bytes()] * REAL_JOBS + [state_dict.read_bytes()] * (JOBS - REAL_JOBS)
        rng.shuffle(models)
        ids = []
        for model in models:
            response = api.client.post(
                "/v1/jobs", files={"model": ("m.pt2", model)}, data={"config": CONFIG}
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        queue = JobQueue(shared.queue_url, shared.queue_name)
        try:  # as if a worker took these messages and died before claiming their jobs
            lost = [queue.huey.dequeue().args[0] for _ in range(LOST_MESSAGES)]
        finally:
            queue.close()

        deadline = time.monotonic() + 180
        next_kill = time.monotonic() + rng.uniform(2, 5)
        while True:
            jobs = api.client.get("/v1/jobs", params={"limit": 100}).json()["data"]
            if sum(job["status"] in FINAL for job in jobs) == JOBS:
                break
            assert time.monotonic() < deadline, [(j["id"], j["status"]) for j in jobs]
            if time.monotonic() >= next_kill and kills < 8:
                index = rng.randrange(len(workers))
                workers[index].kill()  # SIGKILL: wherever it was, nothing runs after
                workers[index] = start_worker()
                kills += 1
                next_kill = time.monotonic() + rng.uniform(2, 5)
            time.sleep(0.2)

        by_id = {job["id"]: job for job in jobs}
        assert sorted(by_id) == sorted(ids)
        for job in by_id.values():
            for artifact in job["artifacts"] if job["status"] == "succeeded" else []:
                if artifact["name"] == "model.onnx":
                    body = api.client.get(artifact["url"]).content
                    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
    finally:
        for process in (api, *workers):
            if process.process.poll() is None:
                process.kill()

    assert kills >= 4, "the workers were not killed often enough to test anything"
    statuses = [by_id[job_id]["status"] for job_id in ids]
    assert set(statuses) <= set(FINAL)
    # Exactly once: no job was finished twice (a worker logs a job's end only when its
    # conditional write won; the reaper logs the jobs it failed).
    text = "".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
    for job_id in ids:
        ends = re.findall(rf"job {job_id}: (succeeded|failed|cancelled)\b", text)
        ends += re.findall(rf"job {job_id}: .* -> (failed|cancelled)", text)
        assert len(ends) <= 1, (job_id, ends)
        if ends:
            assert ends[0] == by_id[job_id]["status"], (job_id, ends)
    for job_id in lost:  # only a sweeper (the API's or a worker's) could give these a message
        assert by_id[job_id]["status"] in FINAL
        assert f"job {job_id}: queued for over 2 s with no message in the queue" in text
    real = mlp_pt2.read_bytes()
    outcomes = [
        (by_id[job_id]["status"], (by_id[job_id]["error"] or {}).get("code")) for job_id in ids
    ]
    expected = [
        ("succeeded", None) if model == real else ("failed", "invalid_model") for model in models
    ]
    assert outcomes == expected  # killed runs were retried, none ran to two outcomes
