"""`compressor serve` as a real process: the happy path, restarts, and a worker killed mid-job."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from api.jobs.database import JobDatabase, JobRecord
from compressor.vocabulary import JOB_STAGES
from tests.support.processes import FAST_ENV, ServerProcess
from tests.support.service import wait_for_job
from tests.support.tiny_models import TinyMLP

pytestmark = pytest.mark.slow

KEY = "serve-test-key-0123456789"
CONFIG = json.dumps({"ratio": 0.5, "finetune": {"steps": 5}, "export": {"latency_seconds": 0}})
ENDLESS = json.dumps({"ratio": 0.5, "finetune": {"steps": 1_000_000}})


@pytest.fixture
def servers(data_dir: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Collect the servers a test starts, and stop any still running at the end."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.kill()


def start_server(
    servers: list[ServerProcess], data_dir: Path, *extra: str, **env: str
) -> ServerProcess:
    """Start `compressor serve` on `data_dir` with API key KEY; wait until it is ready.

    Without workers (`--workers 0`) it is never ready (no live worker): wait for /healthz.
    """
    log = data_dir.parent / f"serve-{len(servers)}.log"
    server = ServerProcess(
        {"COMPRESSOR_DATA_DIR": str(data_dir), "COMPRESSOR_API_KEYS": KEY, **env},
        log, *extra, api_key=KEY,
    )
    servers.append(server)
    server.wait_ready(path="/healthz" if "--workers" in extra else "/readyz")
    return server


def assert_clean_stop(server: ServerProcess) -> None:
    """SIGTERM the server; it must shut down cleanly (uvicorn then re-raises the signal)."""
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()


def submit(
    server: ServerProcess, model: Path, config: str = CONFIG, data: Path | None = None
) -> str:
    """Submit a job (by default a quick one); return its id."""
    files = {"model": ("model.pt2", model.read_bytes())}
    if data is not None:
        files["data"] = ("data.safetensors", data.read_bytes())
    response = server.client.post("/v1/jobs", files=files, data={"config": config})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for_stage(
    server: ServerProcess, job_id: str, stage: str | None, attempts: int = 1, timeout: float = 90
) -> dict:
    """Wait until the job runs `stage` (None: any) in attempt `attempts`; return the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = server.client.get(f"/v1/jobs/{job_id}").json()
        running = job["status"] == "running" and job["attempts"] == attempts
        if running and stage in (None, job["stage"]):
            return job
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"never reached {stage} in attempt {attempts}: {job}"
        time.sleep(0.1)


def nice_of(pid: int) -> int:
    """Return a process's nice value (field 19 of /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def live_worker_pids(data_dir: Path) -> set[int]:
    """Return the pids of the workers that sent a heartbeat within the lease."""
    store = JobDatabase(f"sqlite:///{data_dir / 'jobs.db'}")
    try:
        return {worker.pid for worker in store.live_workers(float(FAST_ENV["COMPRESSOR_LEASE_S"]))}
    finally:
        store.close()


def read_store(data_dir: Path, job_id: str) -> JobRecord:
    """Read the job straight from the SQLite store (no server running)."""
    store = JobDatabase(f"sqlite:///{data_dir / 'jobs.db'}")
    try:
        job = store.get(job_id)
    finally:
        store.close()
    assert job is not None
    return job


def follow_events(server: ServerProcess, job_id: str) -> list[dict]:
    """Read the job's server-sent events until the stream ends; return the job snapshots.

    The first event is the whole job, each later one the fields that changed: merged in turn.
    """
    snapshots: list[dict] = []
    with server.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=180) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                change = json.loads(line.removeprefix("data: "))
                job = {**(snapshots[-1] if snapshots else {}), **change}
                if "loss_curve_added" in change:
                    job["loss_curve"] = job["loss_curve"] + job.pop("loss_curve_added")
                snapshots.append(job)
    return snapshots


def test_happy_path_to_a_verified_onnx_download(
    servers, data_dir: Path, tmp_path: Path, mlp_pt2: Path
) -> None:
    server = start_server(servers, data_dir)
    ready = server.client.get("/readyz").json()
    assert (ready["status"], ready["live_workers"]) == ("ready", 1)
    [worker_pid] = live_worker_pids(data_dir)
    # The embedded worker yields the CPU to the API: its nice value is the server's + 10.
    assert nice_of(worker_pid) == min(19, nice_of(server.process.pid) + 10)
    assert "compressor serve on http://127.0.0.1" in server.log()
    assert "configured" in server.log() and KEY not in server.log()  # keys are never printed
    data = tmp_path / "data.safetensors"
    save_file({"x": torch.randn(64, 32, generator=torch.Generator().manual_seed(1))}, str(data))
    job_id = submit(server, mlp_pt2, data=data)
    snapshots = follow_events(server, job_id)
    assert snapshots[-1]["status"] == "succeeded", snapshots[-1]
    assert [s["progress"] for s in snapshots] == sorted(s["progress"] for s in snapshots)
    # Stages arrive in pipeline order (a fast stage may fall between two polls of the store).
    seen = [s["stage"] for s in snapshots if s["stage"]]
    order = list(JOB_STAGES)
    assert seen == sorted(seen, key=order.index) and seen[-1] == order[-1], seen
    assert len(set(seen)) >= 3, seen

    job = server.client.get(f"/v1/jobs/{job_id}").json()
    artifacts = {a["name"]: a for a in job["artifacts"]}
    assert set(artifacts) == {"model.onnx", "report.json", "job.log"}
    download = server.client.get(artifacts["model.onnx"]["url"])
    assert download.status_code == 200
    assert int(download.headers["content-length"]) == artifacts["model.onnx"]["size"]
    digest = hashlib.sha256(download.content).hexdigest()
    assert digest == artifacts["model.onnx"]["sha256"]
    assert download.headers["etag"] == f'"{digest}"'
    report = server.client.get(artifacts["report.json"]["url"]).json()
    assert report == job["report"]

    metrics = server.client.get("/metrics").text  # observed by the worker process, reported here
    assert 'compressor_job_stage_duration_seconds_count{stage="finetuning"} 1.0' in metrics
    assert 'compressor_jobs_finished_total{status="succeeded"} 1.0' in metrics

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(download.content)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    batch = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    [logits] = session.run(None, {"x": batch})
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    assert_clean_stop(server)


def test_restart_runs_queued_jobs_and_requeues_the_running_one(
    servers, data_dir: Path, tmp_path: Path, mlp_pt2: Path
) -> None:
    api_only = start_server(servers, data_dir, "--workers", "0")
    state_dict = tmp_path / "state_dict.pt2"
    torch.save(TinyMLP().state_dict(), state_dict)  # fails fast in the worker: quick to run
    quick = submit(api_only, state_dict)
    endless = submit(api_only, mlp_pt2, ENDLESS)
    assert_clean_stop(api_only)  # both jobs are still queued

    server = start_server(servers, data_dir)
    job = wait_for_job(server.client, quick, timeout=60)
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "invalid_model", 1)
    wait_for_stage(server, endless, "finetuning")
    assert_clean_stop(server)  # a graceful stop hands the running job back to the queue

    job = read_store(data_dir, endless)
    assert (job.status, job.attempts, job.worker_id) == ("queued", 0, None)
    assert "shut down" in (job.retry_reason or "")


def test_a_server_killed_mid_job_has_the_job_retried_after_its_lease(
    servers, data_dir: Path, mlp_pt2: Path
) -> None:
    first = start_server(servers, data_dir)
    job_id = submit(first, mlp_pt2, ENDLESS)
    wait_for_job(first.client, job_id, ("running",), timeout=60)
    first.kill()  # SIGKILL: no shutdown code runs, the job is left `running`
    killed_at = time.monotonic()
    assert read_store(data_dir, job_id).status == "running"

    second = start_server(servers, data_dir)
    job = wait_for_stage(second, job_id, None, attempts=2)
    # Not before the lease expired (counted from the last heartbeat, up to one before the kill).
    lease_s = float(FAST_ENV["COMPRESSOR_LEASE_S"]) - float(FAST_ENV["COMPRESSOR_HEARTBEAT_S"])
    assert time.monotonic() - killed_at > lease_s
    assert "attempt 1 of 3 stopped renewing its lease" in job["retry_reason"]
    assert second.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert wait_for_job(second.client, job_id, timeout=30)["status"] == "cancelled"
    assert_clean_stop(second)


def test_a_worker_process_killed_mid_job_is_replaced_and_the_job_retried(
    servers, data_dir: Path, mlp_pt2: Path
) -> None:
    server = start_server(servers, data_dir)
    job_id = submit(server, mlp_pt2, ENDLESS)
    wait_for_stage(server, job_id, None)
    worker_id = read_store(data_dir, job_id).worker_id or ""
    worker_pid = int(worker_id.rsplit("-", 3)[1])  # host-pid-random-thread
    os.kill(worker_pid, signal.SIGKILL)

    job = wait_for_stage(server, job_id, None, attempts=2)
    assert "attempt 1 of 3 stopped renewing its lease" in job["retry_reason"]
    assert f"job worker pid {worker_pid} exited with -9; starting a new one" in server.log()
    new_worker = read_store(data_dir, job_id).worker_id or ""
    new_pid = int(new_worker.rsplit("-", 3)[1])
    assert new_pid != worker_pid
    assert new_pid in live_worker_pids(data_dir)  # the replacement heartbeats
    assert server.client.get("/readyz").json()["status"] == "ready"
    assert server.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert wait_for_job(server.client, job_id, timeout=30)["status"] == "cancelled"
    assert_clean_stop(server)
