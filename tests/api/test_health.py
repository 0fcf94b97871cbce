"""Liveness, readiness (store + queue + files), Prometheus metrics."""

from __future__ import annotations

import re

from api.jobs.database import JobDatabase
from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job


def metric(text: str, name: str, **labels: str) -> float:
    """Return the value of one sample from Prometheus text."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    assert found, f"{name} {labels} not in metrics"
    return float(found.group(1))


def test_healthz_and_readyz_answer_ok_with_a_live_worker(make_client) -> None:
    client = make_client(FakeJob(0.0))  # jobs run in this process: it is the live worker
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready", "live_workers": 1,
        "checks": {"store": "ok", "queue": "ok", "files": "ok", "workers": "ok"},
    }
    assert metric(client.get("/metrics").text, "compressor_workers_live") == 1


def test_readyz_is_503_without_a_live_worker_until_one_heartbeats(make_client, data_dir) -> None:
    client = make_client(embedded_worker=False)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["live_workers"] == 0 and body["checks"]["store"] == "ok"
    assert "no live job worker" in body["checks"]["workers"]
    assert "compressor worker" in body["checks"]["workers"]
    assert metric(client.get("/metrics").text, "compressor_workers_live") == 0

    store = JobDatabase(f"sqlite:///{data_dir / 'jobs.db'}")  # a worker elsewhere, same store
    try:
        store.beat_worker("remote-worker-1")
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["live_workers"] == 1
        store.remove_worker("remote-worker-1")  # it stopped cleanly
        assert client.get("/readyz").status_code == 503
    finally:
        store.close()


def test_readyz_can_leave_workers_out_for_api_only_replicas(make_client) -> None:
    client = make_client(embedded_worker=False, ready_requires_worker=False)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok", "queue": "ok", "files": "ok"}
    assert ready.json()["live_workers"] == 0


def test_readyz_is_503_naming_the_broken_dependency(make_client, data_dir) -> None:
    client = make_client(embedded_worker=False)
    (data_dir / "queue.db").unlink()
    (data_dir / "queue.db").mkdir()  # the queue's SQLite file can no longer be opened
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["store"] == "ok" and body["checks"]["queue"] != "ok"


def test_metrics_count_jobs_queue_depth_latency_and_stages(make_client, fake_pt2) -> None:
    client = make_client(FakeJob(0.2))
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    wait_for_job(client, job_id)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "compressor_jobs", status="succeeded") == 1
    assert metric(text, "compressor_jobs", status="queued") == 0
    assert metric(text, "compressor_queue_depth") == 0
    assert metric(text, "compressor_job_stage_duration_seconds_count", stage="finetuning") == 1
    assert metric(
        text, "compressor_http_request_duration_seconds_count",
        method="GET", route="/v1/jobs/{job_id}", status="200",
    ) >= 1
    assert metric(
        text, "compressor_http_request_duration_seconds_count",
        method="POST", route="/v1/jobs", status="202",
    ) == 1


def test_queue_depth_counts_waiting_jobs(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    for _ in range(3):
        client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())})
    text = client.get("/metrics").text
    assert metric(text, "compressor_queue_depth") == 3
    assert metric(text, "compressor_jobs", status="queued") == 3
