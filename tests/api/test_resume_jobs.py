"""A retried job resumes fine-tuning from the checkpoint its last try kept in the job's folder,
with the same artifact as a job never interrupted; what a job keeps goes when it is over."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import compressor
from api.http.schemas import JobPublic
from api.jobs import service
from api.jobs.database import JobDatabase
from api.jobs.tables import jobs
from api.services import Services
from api.workers.background import BackgroundWork
from api.workers.runner import JobRunner
from compressor.vocabulary import (
    CANCELLED,
    FAILED,
    FINETUNING,
    QUEUED,
    RESUME_FOLDER,
    SUCCEEDED,
)
from tests.support.backends import distributed_backend
from tests.support.processes import ServerProcess, ServiceProcess
from tests.support.service import make_settings, wait_for_job

CONFIG = {"ratio": 0.5, "finetune": {"steps": 8, "eval_every": 2, "checkpoint_every": 2},
          "export": {"latency_seconds": 0}}
KEY = "resume-test-key-0123456789"


@pytest.fixture
def services(data_dir: Path) -> Iterator[Services]:
    opened = Services.open(make_settings(data_dir, max_attempts=2))
    yield opened
    opened.close()


def create_job(services: Services, model: Path, config: dict[str, Any] = CONFIG) -> str:
    """Store `model` as a new job's upload and create the queued job; return its id."""
    job_id = uuid.uuid4().hex
    target = services.files.input_path(job_id, "model.pt2")
    target.parent.mkdir(parents=True)
    shutil.copy(model, target)
    services.store.create(job_id, "alice", config, None)
    return job_id


def kept(services: Services, job_id: str) -> Path:
    return services.files.job_dir(job_id) / "out" / RESUME_FOLDER


def model_sha256(services: Services, job_id: str) -> str:
    job = services.store.get(job_id)
    assert job is not None and job.status == SUCCEEDED, job
    return next(a["sha256"] for a in job.artifacts if a["name"] == "model.onnx")


@pytest.mark.slow
def test_a_job_shut_down_mid_finetuning_resumes_on_its_retry_with_the_same_artifact(
        services: Services, mlp_pt2: Path) -> None:
    plain = create_job(services, mlp_pt2)
    JobRunner(services.settings, services.store, services.files, services.metrics,
              requeue=lambda _: None).run(plain)

    def shut_down_at_step_5(*args: Any, progress: Any, **kwargs: Any) -> Any:
        def watching(event: Any) -> None:
            progress(event)
            if event.stage == FINETUNING and event.message.startswith("step 5/"):
                first.shutting_down.set()  # a redeploy: the job goes back to the queue
        return compressor.compress(*args, progress=watching, **kwargs)

    requeued: list[str] = []
    first = JobRunner(services.settings, services.store, services.files, services.metrics,
                      requeue=requeued.append, run_job=shut_down_at_step_5)
    job_id = create_job(services, mlp_pt2)
    first.run(job_id)
    assert (services.store.get(job_id).status, requeued) == (QUEUED, [job_id])
    (product,) = kept(services, job_id).glob("finetune-*")
    # A graceful stop: fine-tuning kept the step it reached, not only step 4's checkpoint.
    assert json.loads((product / "product.json").read_text())["step"] == 5

    JobRunner(services.settings, services.store, services.files, services.metrics,
              requeue=requeued.append).run(job_id)
    log = services.files.artifact_path(job_id, "job.log").read_text()
    assert "fine-tuning: resumed after step 5 of 8 from its checkpoint" in log
    assert model_sha256(services, job_id) == model_sha256(services, plain)
    # What the API, its event stream, the console and `compressor status` show:
    shown = JobPublic.from_record(services.store.get(job_id)).model_dump(mode="json")
    assert shown["resumed"] == (
        "resumed at fine-tuning step 5 of 8; reused: decompositions (2 of 2 layers), "
        "sensitivities, θ as corrected, fine-tuning's state")
    assert JobPublic.from_record(services.store.get(plain)).resumed is None
    assert not kept(services, job_id).exists()


def keep_something(services: Services, job_id: str) -> Path:
    folder = kept(services, job_id) / "finetune-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "product.json").write_text("{}")
    return folder


def test_a_retry_keeps_what_its_last_try_kept_and_nothing_else(
        services: Services, fake_pt2: Path) -> None:
    job_id = create_job(services, fake_pt2)
    folder = keep_something(services, job_id)
    (folder.parent.parent / "job.log").write_text("the last try's log")
    out = services.files.fresh_out_dir(job_id)
    assert [p.name for p in out.iterdir()] == [RESUME_FOLDER]
    assert (folder / "product.json").is_file()


def test_a_queued_retry_cancelled_loses_what_it_kept(services: Services, fake_pt2: Path) -> None:
    job_id = create_job(services, fake_pt2)
    keep_something(services, job_id)
    cancelled = service.cancel_job(services, services.store.get(job_id))
    assert cancelled.status == CANCELLED
    assert not kept(services, job_id).exists()


def test_a_job_out_of_attempts_loses_what_it_kept(services: Services, fake_pt2: Path) -> None:
    job_id = create_job(services, fake_pt2)
    keep_something(services, job_id)
    for attempt in (1, 2):  # max_attempts=2: the second lease lost fails the job for good
        assert services.store.claim(job_id, "w-1", 30) is not None
        with services.store._writer.begin() as conn:  # noqa: SLF001
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(lease_expires_at=0.0))
        BackgroundWork(services, concurrency=0, maintenance=False).reap_once()
        assert kept(services, job_id).exists() == (attempt == 1)
    assert services.store.get(job_id).status == FAILED


# Long enough to be caught between two checkpoints, short enough to finish in seconds.
KILLABLE = json.dumps({"ratio": 0.5, "export": {"latency_seconds": 0}, "finetune": {
    "steps": 400, "eval_every": 50, "checkpoint_every": 50}})


def submit(server: ServerProcess, model: Path) -> str:
    response = server.client.post("/v1/jobs", data={"config": KILLABLE},
                                  files={"model": ("mlp.pt2", model.read_bytes())})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for_a_checkpoint(server: ServerProcess, data_dir: Path, job_id: str) -> Path:
    """Wait until the job kept a fine-tuning checkpoint (not its last); return resume/."""
    kept_dir = data_dir / "jobs" / job_id / "out" / RESUME_FOLDER
    deadline = time.monotonic() + 120
    while not any(not json.loads(p.read_text())["finished"]
                  for p in kept_dir.glob("finetune-*/product.json")):
        assert time.monotonic() < deadline, server.client.get(f"/v1/jobs/{job_id}").json()
        time.sleep(0.02)
    return kept_dir


def assert_resumed_like_an_uninterrupted_job(server: ServerProcess, model: Path, job_id: str,
                                             kept_dir: Path) -> None:
    job = wait_for_job(server.client, job_id, timeout=180)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
    assert job["resumed"].startswith("resumed at fine-tuning step "), job["resumed"]
    assert "reused: decompositions (2 of 2 layers), sensitivities, θ as corrected" in (
        job["resumed"])
    log = server.client.get(f"/v1/jobs/{job_id}/artifacts/job.log").text
    assert "fine-tuning: resumed after step" in log
    assert "calibration: reused 2 of 2 layers' prepared products" in log
    assert not kept_dir.exists()
    plain = wait_for_job(server.client, submit(server, model), timeout=180)
    sha256 = {job["id"]: {a["name"]: a["sha256"] for a in job["artifacts"]}["model.onnx"]
              for job in (job, plain)}
    assert sha256[job_id] == sha256[plain["id"]]


@pytest.mark.slow
def test_a_worker_killed_mid_finetuning_has_its_job_resume_with_the_same_artifact(
        data_dir: Path, mlp_pt2: Path) -> None:
    server = ServerProcess({"COMPRESSOR_DATA_DIR": str(data_dir), "COMPRESSOR_API_KEYS": KEY},
                           data_dir.parent / "serve.log", api_key=KEY)
    try:
        server.wait_ready(path="/readyz")
        job_id = submit(server, mlp_pt2)
        kept_dir = wait_for_a_checkpoint(server, data_dir, job_id)
        store = JobDatabase(f"sqlite:///{data_dir / 'jobs.db'}")
        try:
            worker_id = store.get(job_id).worker_id or ""
        finally:
            store.close()
        os.kill(int(worker_id.rsplit("-", 3)[1]), signal.SIGKILL)  # host-pid-random-thread
        assert_resumed_like_an_uninterrupted_job(server, mlp_pt2, job_id, kept_dir)
    finally:
        if server.process.poll() is None:
            server.kill()


@pytest.mark.slow
@pytest.mark.services
def test_on_postgresql_and_redis_a_killed_workers_job_resumes_on_another_worker(
        data_dir: Path, mlp_pt2: Path) -> None:
    with distributed_backend(data_dir) as backend:
        env = {**backend.env(), "COMPRESSOR_API_KEYS": KEY}
        logs = backend.data_dir.parent
        api = ServerProcess(env, logs / "api.log", "--workers", "0", api_key=KEY)
        workers = [ServiceProcess(["worker"], env, logs / "worker-1.log")]
        try:
            api.wait_ready(path="/healthz")
            job_id = submit(api, mlp_pt2)
            kept_dir = wait_for_a_checkpoint(api, backend.data_dir, job_id)
            workers[0].kill()  # SIGKILL: the job is left running until its lease expires
            workers.append(ServiceProcess(["worker"], env, logs / "worker-2.log"))
            assert_resumed_like_an_uninterrupted_job(api, mlp_pt2, job_id, kept_dir)
        finally:
            for process in (api, *workers):
                if process.process.poll() is None:
                    process.kill()
