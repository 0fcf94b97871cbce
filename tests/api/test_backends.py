"""One suite for the job store, the queue and the job files, run on both backends.

Every test gets `backend`: the embedded one (SQLite store and queue) and the distributed one
(PostgreSQL + Redis, marked `services`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from api.jobs.database import JobDatabase
from api.jobs.folders import JobFolders
from api.jobs.queue import JobQueue
from compressor.vocabulary import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, sha256_of
from tests.support.backends import Backend


@pytest.fixture
def store(backend: Backend) -> Iterator[JobDatabase]:
    """Return a job store on the backend, schema migrated."""
    made = JobDatabase(backend.store_url)
    yield made
    made.close()


@pytest.fixture
def queue(backend: Backend) -> Iterator[JobQueue]:
    """Return a job queue on the backend, emptied afterwards."""
    made = JobQueue(backend.queue_url, backend.queue_name, poll_s=0.02)
    yield made
    made.purge()
    made.close()


def new_job(store: JobDatabase, owner: str = "alice") -> str:
    """Create a queued job with a default config and return its id."""
    job_id = uuid.uuid4().hex
    store.create(job_id, owner, {"method": "lowrank"}, None)
    return job_id


# -- store ----------------------------------------------------------------------------------


def test_created_job_reads_back_for_its_owner_only(store: JobDatabase) -> None:
    job_id = new_job(store, "alice")
    job = store.get(job_id, owner="alice")
    assert job is not None
    assert (job.status, job.progress, job.attempts, job.config) == (
        QUEUED, 0.0, 0, {"method": "lowrank"}
    )
    assert store.get(job_id, owner="bob") is None
    assert store.get("0" * 32) is None


def test_listing_is_newest_first_paged_and_filtered(store: JobDatabase) -> None:
    ids = [new_job(store) for _ in range(5)]
    new_job(store, "bob")
    page = store.list_jobs("alice", limit=3)
    assert [j.id for j in page] == ids[::-1][:3]
    rest = store.list_jobs("alice", limit=3, before_seq=page[-1].seq)
    assert [j.id for j in rest] == ids[::-1][3:]
    store.request_cancel(ids[0])
    assert [j.id for j in store.list_jobs("alice", status=CANCELLED)] == [ids[0]]


def test_counts_in_flight_and_by_status(store: JobDatabase) -> None:
    first, second, third = (new_job(store) for _ in range(3))
    store.claim(second, "w1", 30)
    store.request_cancel(third)
    assert store.count_in_flight("alice") == 2
    assert store.count_in_flight("bob") == 0
    counts = store.count_by_status()
    assert (counts[QUEUED], counts[RUNNING], counts[CANCELLED], counts[SUCCEEDED]) == (1, 1, 1, 0)


def test_only_one_of_many_concurrent_claims_wins(store: JobDatabase) -> None:
    job_id = new_job(store)
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def claim(worker: str) -> None:
        barrier.wait()
        if store.claim(job_id, worker, 30) is not None:
            winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    job = store.get(job_id)
    assert job is not None and (job.status, job.worker_id, job.attempts) == (
        RUNNING, winners[0], 1
    )


def test_only_the_owning_worker_updates_and_finishes(store: JobDatabase) -> None:
    job_id = new_job(store)
    claimed = store.claim(job_id, "w1", 30)
    assert claimed is not None
    assert not store.heartbeat(job_id, "w2", 30)
    assert not store.update_progress(job_id, "w2", "planning", 0.1)
    assert not store.finish(job_id, "w2", FAILED, error={"code": "x", "message": "y"})
    assert store.heartbeat(job_id, "w1", 60)
    assert store.update_progress(job_id, "w1", "finetuning", 0.5)
    job = store.get(job_id)
    assert job is not None and job.lease_expires_at is not None
    assert job.lease_expires_at > (claimed.lease_expires_at or 0)
    assert (job.stage, job.progress) == ("finetuning", 0.5)
    artifacts = [{"name": "model.onnx", "size": 3, "sha256": "ab"}]
    assert store.finish(job_id, "w1", SUCCEEDED, report={"r": 1}, artifacts=artifacts)
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.progress, job.report, job.artifacts) == (
        SUCCEEDED, 1.0, {"r": 1}, artifacts
    )
    assert job.finished_at is not None
    assert store.claim(job_id, "w3", 30) is None  # a duplicate message finds nothing to run


def test_cancel_stops_queued_now_and_flags_running(store: JobDatabase) -> None:
    queued, running = new_job(store), new_job(store)
    store.claim(running, "w1", 30)
    assert not store.is_cancel_requested(running)
    cancelled = store.request_cancel(queued)
    assert cancelled is not None and cancelled.status == CANCELLED
    assert cancelled.error is not None and cancelled.error["code"] == "cancelled"
    flagged = store.request_cancel(running)
    assert flagged is not None and flagged.status == RUNNING and flagged.cancel_requested
    assert store.is_cancel_requested(running)
    assert store.claim(queued, "w2", 30) is None


def test_reaper_requeues_then_fails_after_max_attempts(store: JobDatabase) -> None:
    job_id = new_job(store)
    requeued: list[str] = []
    store.claim(job_id, "w1", 0.01)
    time.sleep(0.05)
    [reaped] = store.reap_expired(2, requeued.append)
    assert (reaped.status, requeued) == (QUEUED, [job_id])
    job = store.get(job_id)
    assert job is not None and job.status == QUEUED and job.worker_id is None
    assert "stopped renewing its lease" in (job.retry_reason or "")
    assert not store.heartbeat(job_id, "w1", 30)  # the dead worker's writes are refused
    store.claim(job_id, "w2", 0.01)
    time.sleep(0.05)
    [reaped] = store.reap_expired(2, requeued.append)
    assert reaped.status == FAILED and requeued == [job_id]
    job = store.get(job_id)
    assert job is not None and job.error is not None
    assert job.error["code"] == "worker_lost"
    assert "attempt 2 of 2" in job.error["message"]


def test_reaper_leaves_live_leases_alone_and_cancels_flagged(store: JobDatabase) -> None:
    live, flagged = new_job(store), new_job(store)
    store.claim(live, "w1", 60)
    store.claim(flagged, "w2", 0.01)
    store.request_cancel(flagged)
    time.sleep(0.05)
    reaped = store.reap_expired(3, lambda _: None)
    assert [(r.id, r.status) for r in reaped] == [(flagged, CANCELLED)]
    live_job = store.get(live)
    assert live_job is not None and live_job.status == RUNNING


def test_reaper_keeps_the_job_running_when_the_queue_fails(store: JobDatabase) -> None:
    job_id = new_job(store)
    store.claim(job_id, "w1", 0.01)
    time.sleep(0.05)

    def broken_queue(_: str) -> None:
        raise ConnectionError("queue down")

    with pytest.raises(ConnectionError):
        store.reap_expired(3, broken_queue)
    job = store.get(job_id)
    assert job is not None and job.status == RUNNING  # the next round tries again
    assert [r.id for r in store.reap_expired(3, lambda _: None)] == [job_id]


def test_release_gives_the_job_back_without_counting_the_attempt(store: JobDatabase) -> None:
    job_id = new_job(store)
    store.claim(job_id, "w1", 30)
    requeued: list[str] = []
    assert not store.release(job_id, "w2", "not yours", requeued.append)
    assert store.release(job_id, "w1", "shutting down", requeued.append)
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.attempts, job.retry_reason, requeued) == (
        QUEUED, 0, "shutting down", [job_id]
    )


def test_delete_removes_the_row(store: JobDatabase) -> None:
    job_id = new_job(store)
    assert store.delete(job_id)
    assert not store.delete(job_id)
    assert store.get(job_id) is None
    assert store.is_cancel_requested(job_id)  # a deleted job must stop


def test_migrations_run_once_and_reopen_cleanly(backend: Backend, store: JobDatabase) -> None:
    job_id = new_job(store)
    again = JobDatabase(backend.store_url)
    try:
        assert again.get(job_id) is not None
        with again._reader.connect() as conn:  # noqa: SLF001 (checking the schema itself)
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == "0004"
    finally:
        again.close()


def test_store_ping_fails_on_an_unreachable_database(tmp_path) -> None:
    store = JobDatabase(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.ping()
    store.close()
    with pytest.raises(sa.exc.OperationalError):
        JobDatabase(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'jobs.db'}")


# -- queue ----------------------------------------------------------------------------------


def test_queue_delivers_each_message_to_one_worker(queue: JobQueue) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def handle(job_id: str) -> None:
        with lock:
            seen.append(job_id)

    for i in range(6):
        queue.enqueue(f"job{i}")
    assert queue.depth() == 6
    consumer = queue.consumer(handle, workers=3)
    consumer.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        consumer.stop(graceful=True)
    assert sorted(seen) == [f"job{i}" for i in range(6)]
    assert queue.depth() == 0


def test_queue_keeps_messages_for_a_later_consumer(backend: Backend, queue: JobQueue) -> None:
    queue.enqueue("job-a")
    queue.close()
    reopened = JobQueue(backend.queue_url, backend.queue_name)
    assert reopened.depth() == 1
    reopened.ping()
    reopened.purge()
    assert reopened.depth() == 0


# -- files ----------------------------------------------------------------------------------


def test_upload_appears_only_when_committed(backend: Backend) -> None:
    files = JobFolders(backend.data_dir)
    job_id = uuid.uuid4().hex
    sink = files.open_upload(job_id, "model.pt2")
    sink.write(b"PK\x03\x04")
    sink.write(b"rest")
    target = files.input_path(job_id, "model.pt2")
    assert not target.exists()
    sink.commit()
    assert target.read_bytes() == b"PK\x03\x04rest"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt2"]


def test_aborted_upload_leaves_nothing(backend: Backend) -> None:
    files = JobFolders(backend.data_dir)
    job_id = uuid.uuid4().hex
    sink = files.open_upload(job_id, "data.npz")
    sink.write(b"x" * 1000)
    sink.abort()
    sink.abort()
    assert list(files.input_path(job_id, "data.npz").parent.iterdir()) == []


def test_artifacts_are_described_and_deleted_with_the_job(backend: Backend) -> None:
    files = JobFolders(backend.data_dir)
    job_id = uuid.uuid4().hex
    out = files.fresh_out_dir(job_id)
    (out / "model.onnx").write_bytes(b"onnx bytes")
    (out / "job.log").write_text("log")
    described = files.describe_artifacts(job_id)
    assert [(a["name"], a["size"]) for a in described] == [("model.onnx", 10), ("job.log", 3)]
    assert described[0]["sha256"] == sha256_of(out / "model.onnx")
    assert files.artifact_path(job_id, "report.json") is None
    assert files.artifact_path(job_id, "../../etc/passwd") is None
    assert files.job_ids() == [job_id]
    files.delete_job(job_id)
    assert files.job_ids() == []


def test_files_refuse_paths_that_are_not_job_ids(backend: Backend) -> None:
    files = JobFolders(backend.data_dir)
    for bad in ("../x", "ABC", "", "0" * 31):
        with pytest.raises(ValueError, match="not a job id"):
            files.job_dir(bad)
    with pytest.raises(ValueError, match="unknown input"):
        files.input_path("0" * 32, "evil.sh")


# -- the store's clock, the sweeper, worker heartbeats, loss points ----------------------------


def queue_and_store(backend: Backend) -> dict[str, object]:
    """Return the Settings fields that put an app's store and queue on `backend`."""
    fields = backend.settings_fields()
    del fields["data_dir"]  # the same folder as the app's own `data_dir` fixture
    return fields


def skew_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make this process's clock (time.time) run `seconds` ahead of the real one."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_leases_use_the_stores_clock_not_the_callers(
    store: JobDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_now = store.now()
    assert abs(db_now - time.time()) < 5
    job_id = new_job(store)
    skew_clock(monkeypatch, -3600)  # a worker whose clock is an hour behind
    claimed = store.claim(job_id, "w1", 30)
    assert claimed is not None and claimed.lease_expires_at is not None
    assert abs(claimed.lease_expires_at - (db_now + 30)) < 5  # not already expired
    assert abs((claimed.started_at or 0) - db_now) < 5
    skew_clock(monkeypatch, +3600)  # a reaper whose clock is an hour ahead
    assert store.reap_expired(3, lambda _: None) == []  # cannot steal the live job
    assert store.heartbeat(job_id, "w1", 30)
    assert store.finish(job_id, "w1", SUCCEEDED)
    job = store.get(job_id)
    assert job is not None and abs((job.finished_at or 0) - db_now) < 5


def test_a_lease_expires_on_the_stores_clock_whatever_the_reapers(
    store: JobDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = new_job(store)
    skew_clock(monkeypatch, +3600)  # the worker's clock is ahead: its lease must not outlive it
    store.claim(job_id, "w1", 0.05)
    skew_clock(monkeypatch, -3600)  # and a reaper behind still sees it expire
    time.sleep(0.2)
    assert [r.id for r in store.reap_expired(3, lambda _: None)] == [job_id]


def test_sweeper_requeues_a_job_whose_message_was_taken_but_never_run(
    store: JobDatabase, queue: JobQueue
) -> None:
    bound = 1.0  # seconds a queued job may wait for its message; margins for a loaded machine
    lost, waiting = new_job(store), new_job(store)
    queue.enqueue(lost)
    queue.huey.dequeue()  # a worker took the message, then died before claiming the job
    queue.enqueue(waiting)  # still in the queue: left alone
    time.sleep(bound + 0.2)
    fresh = new_job(store)  # queued too recently to judge (its message may be on its way)
    assert queue.pending_ids() == {waiting}
    assert store.requeue_lost(bound, queue.pending_ids, queue.enqueue) == [lost]
    assert queue.pending_ids() == {waiting, lost}
    job = store.get(lost)
    assert job is not None and job.status == QUEUED
    assert "no message in the queue" in (job.retry_reason or "")
    assert store.requeue_lost(bound, queue.pending_ids, queue.enqueue) == []  # it has one now
    assert fresh not in queue.pending_ids()
    assert store.claim(lost, "w1", 30) is not None  # a running job is never swept
    time.sleep(bound + 0.2)
    queue.purge()
    requeued = store.requeue_lost(bound, queue.pending_ids, queue.enqueue)
    assert sorted(requeued) == sorted([waiting, fresh])


def test_sweeper_leaves_the_job_for_the_next_round_when_the_queue_fails(
    store: JobDatabase, queue: JobQueue
) -> None:
    job_id = new_job(store)
    time.sleep(0.2)

    def broken_queue(_: str) -> None:
        raise ConnectionError("queue down")

    with pytest.raises(ConnectionError):
        store.requeue_lost(0.1, queue.pending_ids, broken_queue)
    job = store.get(job_id)
    assert job is not None and job.retry_reason is None  # rolled back: judged again next round
    assert store.requeue_lost(0.1, queue.pending_ids, queue.enqueue) == [job_id]


def test_background_sweep_counts_and_logs_what_it_requeued(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    from api.services import Services
    from api.workers.background import BackgroundWork
    from tests.support.service import make_settings

    services = Services.open(
        make_settings(backend.data_dir, requeue_after_s=0.1, **queue_and_store(backend))
    )
    try:
        job_id = new_job(services.store)
        time.sleep(0.3)
        with caplog.at_level("WARNING", logger="api"):
            BackgroundWork(services, concurrency=0).sweep_once()
        assert services.queue.pending_ids() == {job_id}
        assert f"job {job_id}: queued for over 0.1 s with no message" in caplog.text
        text = services.metrics.render().decode()
        assert 'compressor_jobs_requeued_total{reason="lost_message"} 1.0' in text
    finally:
        services.queue.purge()
        services.close()


def test_worker_heartbeats_on_the_stores_clock(
    store: JobDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.live_workers(30) == []
    skew_clock(monkeypatch, -3600)  # a worker whose clock is behind is still live
    store.beat_worker("w-a")
    store.beat_worker("w-b")
    store.beat_worker("w-a")  # a second beat renews the row
    live = {w.id: w for w in store.live_workers(30)}
    assert sorted(live) == ["w-a", "w-b"]
    assert live["w-a"].pid == os.getpid()
    assert live["w-a"].last_seen_at >= live["w-a"].started_at
    store.remove_worker("w-b")
    assert [w.id for w in store.live_workers(30)] == ["w-a"]
    time.sleep(0.3)
    assert store.live_workers(0.2) == []  # silent longer than the window: dead
    assert store.prune_workers(0.2) == 1
    assert store.live_workers(3600) == []


def test_progress_records_when_each_stage_started_on_the_stores_clock(store: JobDatabase) -> None:
    job_id = new_job(store)
    store.claim(job_id, "w1", 30)
    before = store.now()
    assert store.update_progress(job_id, "w1", "loading", 0.0)
    time.sleep(0.05)
    assert store.update_progress(job_id, "w1", "loading", 0.05)  # the same stage: kept
    assert store.update_progress(job_id, "w1", "planning", 0.1)
    assert not store.update_progress(job_id, "w2", "rewriting", 0.2)  # not w2's job
    times = store.get(job_id).stage_times  # type: ignore[union-attr]
    assert list(times) == ["loading", "planning"]
    assert before <= times["loading"] < times["planning"] - 0.04 <= store.now()
    store.release(job_id, "w1", "stop", lambda _: None)
    assert store.claim(job_id, "w2", 30).stage_times == {}  # type: ignore[union-attr]  # a new run


def test_progress_stores_the_recent_loss_points(store: JobDatabase) -> None:
    job_id = new_job(store)
    store.claim(job_id, "w1", 30)
    assert store.get(job_id).loss_curve == []  # type: ignore[union-attr]
    points = [[1, 2.5], [2, 1.25]]
    assert store.update_progress(job_id, "w1", "finetuning", 0.3, points)
    assert store.update_progress(job_id, "w1", "finetuning", 0.4)  # no points: kept as they were
    assert store.get(job_id).loss_curve == points  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="at most 100 loss points"):
        store.update_progress(job_id, "w1", "finetuning", 0.5, [[i, 1.0] for i in range(101)])
    store.release(job_id, "w1", "stop", lambda _: None)
    assert store.claim(job_id, "w2", 30).loss_curve == []  # type: ignore[union-attr]  # a new run


def test_a_running_jobs_log_is_served_line_by_line(backend: Backend, make_client, fake_pt2) -> None:
    from compressor.runtime.joblog import JobLog

    release = threading.Event()

    def logging_job(model, config, *, out_dir, progress=None, should_stop=None, **_):
        log = JobLog(out_dir / "job.log")
        log.info("loaded the model")
        from tests.support.fakes import FakeJob

        while not release.wait(0.05):
            if should_stop():
                break
        log.info("done")
        log.close()
        return FakeJob(0.0)(model, config, out_dir=out_dir)

    client = make_client(logging_job, **queue_and_store(backend))
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    deadline = time.monotonic() + 20
    while True:
        response = client.get(f"/v1/jobs/{job_id}/artifacts/job.log")
        assert response.status_code == 200, response.text  # empty before the first line
        if response.text:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert response.headers["x-job-status"] == "running"
    assert "etag" not in response.headers
    assert response.text.endswith("] loaded the model\n")
    release.set()
    from tests.support.service import wait_for_job

    assert wait_for_job(client, job_id)["status"] == "succeeded"
    final = client.get(f"/v1/jobs/{job_id}/artifacts/job.log")
    assert final.status_code == 200 and final.text == "fake job\n" and "etag" in final.headers
