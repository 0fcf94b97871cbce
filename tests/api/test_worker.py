"""JobRunner: claims a job, runs the job function, stores every outcome; leases and shutdown."""

from __future__ import annotations

import errno
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api.jobs.database import JobRecord
from api.jobs.tables import jobs
from api.services import Services
from api.workers.runner import JobRunner, LossCurve
from compressor.errors import InternalError, ResourceError, UnsafeModelError
from compressor.runtime.progress import ProgressEvent
from compressor.vocabulary import CANCELLED, FAILED, JOB_STAGES, QUEUED, RUNNING, SUCCEEDED
from tests.support.fakes import FakeJob
from tests.support.service import make_settings


@pytest.fixture
def services(data_dir: Path) -> Iterator[Services]:
    """Open the embedded services with fast leases."""
    opened = Services.open(make_settings(data_dir, progress_interval_s=0.3))
    yield opened
    opened.close()


def submit(services: Services, model: Path) -> str:
    """Store `model` as a new job's upload and create the queued job; return its id."""
    job_id = uuid.uuid4().hex
    target = services.files.input_path(job_id, "model.pt2")
    target.parent.mkdir(parents=True)
    shutil.copy(model, target)
    services.store.create(job_id, "alice", {"finetune": {"steps": 5}}, None)
    return job_id


def make_runner(services: Services, job: Callable[..., Any], requeued: list[str] | None = None) -> JobRunner:
    """Return a runner that sends re-queued ids to `requeued`."""
    sink = requeued if requeued is not None else []
    return JobRunner(
        services.settings, services.store, services.files, services.metrics,
        requeue=sink.append, run_job=job,
    )


def stored(services: Services, job_id: str) -> JobRecord:
    """Return the job as stored now."""
    job = services.store.get(job_id)
    assert job is not None
    return job


def run_in_thread(runner: JobRunner, job_id: str) -> threading.Thread:
    """Start `runner.run(job_id)` in a thread and return it."""
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()
    return thread


def test_success_stores_report_artifacts_and_drops_the_upload(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    fake = FakeJob(0.1)
    make_runner(services, fake).run(job_id)
    job = stored(services, job_id)
    assert (job.status, job.progress, job.stage, job.attempts) == (SUCCEEDED, 1.0, JOB_STAGES[-1], 1)
    assert job.report == {"fake": True, "config": {"finetune": {"steps": 5}}}
    assert [a["name"] for a in job.artifacts] == ["model.onnx", "report.json", "job.log"]
    assert fake.calls[0]["model"] == services.files.input_path(job_id, "model.pt2")
    assert not services.files.input_path(job_id, "model.pt2").exists()
    metrics = services.metrics.render().decode()
    assert 'compressor_job_stage_duration_seconds_count{stage="finetuning"} 1.0' in metrics
    assert 'compressor_jobs_finished_total{status="succeeded"} 1.0' in metrics


def test_core_error_fails_the_job_with_its_code_and_message(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    error = UnsafeModelError("the archive holds a pickle that imports os.system; refused")
    make_runner(services, FakeJob(0.0, error)).run(job_id)
    job = stored(services, job_id)
    assert job.status == FAILED
    assert job.error == {"code": "unsafe_model", "message": error.message}


def test_a_crash_fails_the_job_as_internal_error(services: Services, fake_pt2: Path) -> None:
    job_id = submit(services, fake_pt2)
    make_runner(services, FakeJob(0.0, ZeroDivisionError("boom"))).run(job_id)
    job = stored(services, job_id)
    assert job.status == FAILED and job.error is not None
    assert job.error["code"] == "internal_error"
    assert "ZeroDivisionError: boom" in job.error["message"]
    # The message names an id; job.log (an artifact of the failed job) holds the traceback
    # under it, and /metrics counts the internal error.
    error_id = re.search(r"internal error ([0-9a-f]{8})", job.error["message"]).group(1)
    assert "Traceback" not in job.error["message"]
    log_text = services.files.artifact_path(job_id, "job.log").read_text()
    assert f"traceback of internal error {error_id}:" in log_text
    assert "ZeroDivisionError: boom" in log_text and f"end of traceback {error_id}" in log_text
    assert "job.log" in [a["name"] for a in job.artifacts]
    assert "compressor_job_internal_errors_total 1.0" in services.metrics.render().decode()


def test_an_internal_error_from_the_core_keeps_its_id_and_is_counted(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    error = InternalError.wrapping(KeyError("theta"), "rewriting")
    make_runner(services, FakeJob(0.0, error)).run(job_id)
    job = stored(services, job_id)
    assert job.error == {"code": "internal_error", "message": error.message}
    assert f"internal error {error.error_id} in stage rewriting: KeyError" in error.message
    assert "compressor_job_internal_errors_total 1.0" in services.metrics.render().decode()
    core_refusal = submit(services, fake_pt2)
    make_runner(services, FakeJob(0.0, UnsafeModelError("refused"))).run(core_refusal)
    assert "compressor_job_internal_errors_total 1.0" in services.metrics.render().decode()


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", "/data/jobs/x/out/model.onnx.data")


@pytest.mark.parametrize(
    "error",
    [
        ResourceError("the job's artifacts need about 8.0 GiB of disk and /data has 1.0 GiB free; "
                      "free some space (or delete old jobs) and retry"),
        full_disk(),  # the disk filled up later, in the middle of a stage
    ],
    ids=["refused-at-start", "filled-while-running"],
)
def test_a_full_disk_fails_the_job_as_insufficient_resources(
    services: Services, fake_pt2: Path, error: Exception
) -> None:
    job_id = submit(services, fake_pt2)
    make_runner(services, FakeJob(0.0, error)).run(job_id)
    job = stored(services, job_id)
    assert job.status == FAILED and job.error is not None
    assert job.error["code"] == "insufficient_resources"
    if isinstance(error, ResourceError):
        assert job.error["message"] == error.message
    else:
        assert "No space left on device writing model.onnx.data" in job.error["message"]
        assert "/data/jobs" not in job.error["message"]  # no server paths in a user's answer
    assert "compressor_job_internal_errors_total 1.0" not in services.metrics.render().decode()


def test_a_full_disk_the_core_reported_as_internal_is_insufficient_resources(
    services: Services, fake_pt2: Path
) -> None:
    try:
        raise InternalError.wrapping(full_disk(), "exporting") from full_disk()
    except InternalError as wrapped:
        error = wrapped
    job_id = submit(services, fake_pt2)
    make_runner(services, FakeJob(0.0, error)).run(job_id)
    assert stored(services, job_id).error["code"] == "insufficient_resources"


def test_cancel_flag_stops_a_running_job_within_the_poll(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    fake = FakeJob(30.0)
    thread = run_in_thread(make_runner(services, fake), job_id)
    assert fake.started.wait(5)
    asked = time.monotonic()
    services.store.request_cancel(job_id)
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - asked < 2
    job = stored(services, job_id)
    assert job.status == CANCELLED and job.error is not None
    assert job.error["code"] == "cancelled"


def test_shutdown_releases_the_running_job_to_the_queue(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    fake, requeued = FakeJob(30.0), []
    runner = make_runner(services, fake, requeued)
    thread = run_in_thread(runner, job_id)
    assert fake.started.wait(5)
    runner.shutting_down.set()
    thread.join(5)
    job = stored(services, job_id)
    assert (job.status, job.attempts, requeued) == (QUEUED, 0, [job_id])
    assert "shut down" in (job.retry_reason or "")


def test_a_job_taken_away_by_the_reaper_is_not_finished_by_its_old_worker(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    fake = FakeJob(30.0)
    thread = run_in_thread(make_runner(services, fake), job_id)
    assert fake.started.wait(5)
    reaped = []
    for _ in range(20):  # expire the lease (the store's clock decides), racing the heartbeat
        with services.store._writer.begin() as conn:  # noqa: SLF001
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(lease_expires_at=0.0))
        reaped = services.store.reap_expired(3, lambda _: None)
        if reaped:
            break
    assert [r.status for r in reaped] == [QUEUED]
    thread.join(5)  # the heartbeat notices, should_stop answers True, the outcome is dropped
    assert not thread.is_alive()
    job = stored(services, job_id)
    assert (job.status, job.attempts, job.error) == (QUEUED, 1, None)


def test_heartbeat_keeps_a_silent_job_alive_past_its_lease(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    silent_seconds = 2 * services.settings.lease_s

    def silent_job(model, config, *, out_dir, **_):  # no progress, never polls should_stop
        time.sleep(silent_seconds)
        return FakeJob(0.0)(model, config, out_dir=out_dir)

    started = time.monotonic()
    thread = run_in_thread(make_runner(services, silent_job), job_id)
    while stored(services, job_id).status != RUNNING:
        time.sleep(0.01)
    deadline = started + silent_seconds - 0.5
    while time.monotonic() < deadline:
        assert services.store.reap_expired(3, lambda _: None) == []
        assert stored(services, job_id).status == RUNNING
        time.sleep(0.2)
    thread.join(10)
    assert (stored(services, job_id).status, stored(services, job_id).attempts) == (SUCCEEDED, 1)


def test_progress_writes_are_throttled_but_every_stage_is_stored(
    services: Services, fake_pt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(services, fake_pt2)
    writes: list[tuple[str, float]] = []
    original = services.store.update_progress

    def counting(job: str, worker: str, stage: str, progress: float, *args, **kwargs) -> bool:
        writes.append((stage, progress))
        return original(job, worker, stage, progress, *args, **kwargs)

    monkeypatch.setattr(services.store, "update_progress", counting)
    fake = FakeJob(1.2)  # about 60 progress events over 1.2 s
    make_runner(services, fake).run(job_id)
    stages = [stage for stage, _ in writes]
    assert sorted(set(stages), key=stages.index) == list(JOB_STAGES)
    assert len(writes) <= len(JOB_STAGES) + 1.2 / 0.3 + 2
    assert [p for _, p in writes] == sorted(p for _, p in writes)


def test_a_duplicate_message_does_not_run_the_job_twice(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    fake = FakeJob(0.0)
    runner = make_runner(services, fake)
    runner.run(job_id)
    runner.run(job_id)
    assert len(fake.calls) == 1
    assert stored(services, job_id).attempts == 1


def test_a_missing_upload_fails_with_a_message_about_shared_storage(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)
    services.files.delete_inputs(job_id)
    fake = FakeJob(0.0)
    make_runner(services, fake).run(job_id)
    job = stored(services, job_id)
    assert fake.calls == []
    assert job.error is not None and job.error["code"] == "input_missing"
    assert "COMPRESSOR_DATA_DIR" in job.error["message"]


def test_a_job_deleted_while_running_leaves_no_files(services: Services, fake_pt2: Path) -> None:
    job_id = submit(services, fake_pt2)
    fake = FakeJob(30.0)
    thread = run_in_thread(make_runner(services, fake), job_id)
    assert fake.started.wait(5)
    services.store.delete(job_id)
    thread.join(5)
    assert not thread.is_alive()
    assert job_id not in services.files.job_ids()


def test_progress_of_an_unknown_stage_is_not_stored(services: Services, fake_pt2: Path) -> None:
    job_id = submit(services, fake_pt2)
    seen: list[str | None] = []

    def odd_stages(model, config, *, out_dir, progress, **_):
        progress(ProgressEvent("planning", 1.0, 0.1))
        progress(ProgressEvent("materializing", 0.5, 0.6))
        seen.append(stored(services, job_id).stage)
        return FakeJob(0.0)(model, config, out_dir=out_dir)

    make_runner(services, odd_stages).run(job_id)
    assert seen == ["planning"]
    assert stored(services, job_id).status == SUCCEEDED


def test_loss_curve_keeps_at_most_100_evenly_spaced_points() -> None:
    curve = LossCurve()
    for step in range(1, 1001):
        curve.add(step, 1.0 / step)
    steps = [int(step) for step, _ in curve.points]
    assert 50 <= len(steps) <= 100
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    assert gaps == {curve.stride} and steps[-1] > 900  # the whole run, evenly
    curve.add(curve.stride * 1000, float("nan"))  # a diverged step is left out
    assert all(loss == loss for _, loss in curve.points)


def test_fine_tuning_losses_reach_the_job_while_it_runs(
    services: Services, fake_pt2: Path
) -> None:
    job_id = submit(services, fake_pt2)  # config: finetune.steps 5
    seen: list[list[list[float]]] = []

    def finetuning_job(model, config, *, out_dir, progress, should_stop, **_):
        for step in range(1, 6):
            progress(ProgressEvent("finetuning", step / 5, 0.5, f"step {step}/5", 1.0 / step))
            time.sleep(0.35)  # past progress_interval_s: every point is written
            seen.append(stored(services, job_id).loss_curve)
        progress(ProgressEvent("exporting", 0.0, 0.8))
        return FakeJob(0.0)(model, config, out_dir=out_dir)

    make_runner(services, finetuning_job).run(job_id)
    assert [len(points) for points in seen] == [1, 2, 3, 4, 5]
    job = stored(services, job_id)
    assert job.status == SUCCEEDED
    assert job.loss_curve == [[step, round(1.0 / step, 6)] for step in range(1, 6)]
