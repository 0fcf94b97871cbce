"""Artifact downloads (Content-Length, ETag = sha256, Range) and the server-sent event stream."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from compressor.runtime.progress import STAGES, ProgressEvent, overall_progress
from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job

# The weights of an ONNX model past 2 GiB, in small: several of the server's 64 KiB chunks.
EXTERNAL_DATA = random.Random(11).randbytes(300_000)


def job_with_external_data(model: Path, config: Any, *, out_dir: Path, **kwargs: Any) -> Any:
    """Finish like FakeJob, with a model.onnx.data beside model.onnx (external data)."""
    result = FakeJob(0.0)(model, config, out_dir=out_dir, **kwargs)
    (Path(out_dir) / "model.onnx.data").write_bytes(EXTERNAL_DATA)
    return result


@pytest.fixture
def finished(make_client, fake_pt2):
    """Return (client, job) for a job that succeeded."""
    client = make_client(FakeJob(0.0))
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    return client, wait_for_job(client, job_id)


def parse_events(text: str) -> list[tuple[str, dict]]:
    """Return (event name, JSON data) for each event of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_download_has_length_etag_and_the_stored_digest(finished) -> None:
    client, job = finished
    for artifact in job["artifacts"]:
        response = client.get(artifact["url"])
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == artifact["size"] == len(response.content)
        assert response.headers["etag"] == f'"{artifact["sha256"]}"'
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    assert client.get(job["artifacts"][1]["url"]).headers["content-type"] == "application/json"


def test_range_requests_answer_206_with_the_slice(finished) -> None:
    client, job = finished
    url, whole = job["artifacts"][0]["url"], client.get(job["artifacts"][0]["url"]).content
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert part.headers["content-length"] == "100"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, whole[-10:])
    assert client.get(url, headers={"Range": f"bytes={len(whole) + 5}-"}).status_code == 416


@pytest.fixture
def big(make_client, fake_pt2):
    """Return (client, job) for a job whose model.onnx has its weights in model.onnx.data."""
    client = make_client(job_with_external_data)
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    return client, wait_for_job(client, job_id)


def test_the_external_data_file_is_listed_with_its_digest_and_served(big) -> None:
    client, job = big
    assert job["status"] == "succeeded"
    listed = {a["name"]: a for a in job["artifacts"]}
    assert list(listed) == ["model.onnx", "model.onnx.data", "report.json", "job.log"]
    data = listed["model.onnx.data"]
    assert data["size"] == len(EXTERNAL_DATA)
    assert data["sha256"] == hashlib.sha256(EXTERNAL_DATA).hexdigest()
    response = client.get(data["url"])
    assert response.status_code == 200 and response.content == EXTERNAL_DATA
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["etag"] == f'"{data["sha256"]}"'


def test_every_artifact_resumes_from_a_byte_with_range(big) -> None:
    client, job = big
    for artifact in job["artifacts"]:
        whole = client.get(artifact["url"]).content
        assert len(whole) == artifact["size"]
        start = artifact["size"] // 3
        response = client.get(artifact["url"], headers={
            "Range": f"bytes={start}-", "If-Range": f'"{artifact["sha256"]}"'})
        assert response.status_code == 206, artifact["name"]
        assert response.content == whole[start:]
        assert response.headers["content-range"] == f"bytes {start}-{len(whole) - 1}/{len(whole)}"
        assert response.headers["content-length"] == str(len(whole) - start)
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["etag"] == f'"{artifact["sha256"]}"'


def test_a_range_inside_the_data_file_is_those_exact_bytes(big) -> None:
    client, job = big
    url = f"/v1/jobs/{job['id']}/artifacts/model.onnx.data"
    response = client.get(url, headers={"Range": "bytes=65530-131080"})
    assert response.status_code == 206
    assert response.content == EXTERNAL_DATA[65530:131081]
    assert response.headers["content-range"] == f"bytes 65530-131080/{len(EXTERNAL_DATA)}"


def test_a_range_past_the_end_is_416_naming_the_size(big) -> None:
    client, job = big
    url = f"/v1/jobs/{job['id']}/artifacts/model.onnx.data"
    for unsatisfiable in (f"bytes={len(EXTERNAL_DATA)}-", "bytes=400000-500000", "bytes=-0"):
        response = client.get(url, headers={"Range": unsatisfiable})
        assert response.status_code == 416, unsatisfiable
        assert response.headers["content-range"] == f"bytes */{len(EXTERNAL_DATA)}"
        error = response.json()["error"]
        assert error["code"] == "range_not_satisfiable"
        assert f"{len(EXTERNAL_DATA)} bytes" in error["message"]


def test_if_range_with_another_etag_answers_the_whole_file(big) -> None:
    client, job = big
    url = f"/v1/jobs/{job['id']}/artifacts/model.onnx.data"
    for stale in ('"' + "0" * 64 + '"', 'W/"whatever"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        response = client.get(url, headers={"Range": "bytes=1000-", "If-Range": stale})
        assert response.status_code == 200, stale
        assert response.content == EXTERNAL_DATA
        assert "content-range" not in response.headers
    # A stale If-Range never answers 416 either: the client gets the new file.
    response = client.get(url, headers={"Range": "bytes=999999-", "If-Range": '"other"'})
    assert (response.status_code, response.content) == (200, EXTERNAL_DATA)


@pytest.mark.parametrize("header", ["bytes=abc-", "bytes=10-5", "lines=1-2", "bytes=", "bytes=-"])
def test_a_range_that_does_not_parse_is_ignored(big, header) -> None:
    client, job = big
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx.data",
                          headers={"Range": header})
    assert (response.status_code, response.content) == (200, EXTERNAL_DATA)


def test_if_none_match_with_the_etag_is_304(finished) -> None:
    client, job = finished
    artifact = job["artifacts"][0]
    response = client.get(artifact["url"], headers={"If-None-Match": f'"{artifact["sha256"]}"'})
    assert response.status_code == 304 and response.content == b""
    assert client.get(artifact["url"], headers={"If-None-Match": '"other"'}).status_code == 200


def test_unknown_artifact_is_404_listing_what_exists(finished) -> None:
    client, job = finished
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/weights.bin")
    assert response.status_code == 404
    assert "model.onnx, report.json, job.log" in response.json()["error"]["message"]


def test_artifacts_of_an_unfinished_job_are_404_saying_so(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
    assert response.status_code == 404
    assert "the job is queued" in response.json()["error"]["message"]


def test_a_queued_jobs_log_is_empty_not_missing(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/artifacts/job.log")
    assert (response.status_code, response.text) == (200, "")
    assert response.headers["x-job-status"] == "queued"
    assert "etag" not in response.headers


def applied(events: list[tuple[str, dict]]) -> list[dict]:
    """Return the job after each event: the first whole, each `change` merged into it."""
    name, job = events[0]
    assert name == "job"
    states = [job]
    for name, change in events[1:]:
        assert name == "change" and change["id"] == job["id"]
        job = {**job, **change}
        added = job.pop("loss_curve_added", None)
        if added is not None:
            job["loss_curve"] = [*states[-1]["loss_curve"], *added]
        states.append(job)
    return states


def test_events_follow_a_job_to_its_end(make_client, fake_pt2) -> None:
    client = make_client(FakeJob(1.0))
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_events(response.read().decode())
    states = applied(events)
    statuses = [state["status"] for state in states]
    assert statuses[-1] == "succeeded" and "running" in statuses
    progress = [state["progress"] for state in states]
    assert progress == sorted(progress) and len(set(progress)) > 3
    stages = [state["stage"] for state in states if state["stage"]]
    assert stages[0] == "loading" and "finetuning" in stages
    assert states[-1]["artifacts"]
    assert list(states[-1]["stage_times"]) == list(STAGES)  # each stage's start, in order


def fine_tuning_job(model: Path, config: Any, *, out_dir: Path, progress: Any = None,
                    **kwargs: Any) -> Any:
    """Report 150 fine-tuning losses (more than the store keeps, so the curve gets thinned)."""
    progress(ProgressEvent("loading", 0.0, overall_progress("loading", 0.0)))
    for step in range(1, 151):
        fraction = step / 150
        progress(ProgressEvent("finetuning", fraction, overall_progress("finetuning", fraction),
                               loss=1 / step))
        time.sleep(0.01)
    return FakeJob(0.0)(model, config, out_dir=out_dir, **kwargs)


def test_events_after_the_first_send_only_what_changed(make_client, fake_pt2) -> None:
    client = make_client(fine_tuning_job)
    job_id = client.post(
        "/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())},
        data={"config": json.dumps({"finetune": {"steps": 150}})},
    ).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = parse_events(response.read().decode())
    assert "config" in events[0][1] and "loss_curve" in events[0][1]  # the first event: whole
    changes = [data for _, data in events[1:]]
    assert len(changes) > 5
    assert all("config" not in change and len(change) > 1 for change in changes)
    assert all(change.get("status", "running") == "running" for change in changes[:-1])
    added = [change["loss_curve_added"] for change in changes if "loss_curve_added" in change]
    thinned = [change["loss_curve"] for change in changes if "loss_curve" in change]
    assert len(added) > 3 and thinned  # new points only, and the whole curve once it was thinned
    assert max(map(len, added)) < 100
    # The deltas rebuild exactly the job the API answers.
    assert applied(events)[-1] == client.get(f"/v1/jobs/{job_id}").json()
    reconnected = parse_events(client.get(f"/v1/jobs/{job_id}/events").text)
    assert reconnected == [("job", client.get(f"/v1/jobs/{job_id}").json())]


def test_events_end_with_deleted_when_the_job_is_deleted(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    threading.Timer(0.5, lambda: client.delete(f"/v1/jobs/{job_id}")).start()
    started = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = parse_events(response.read().decode())
    assert [name for name, _ in events] == ["job", "deleted"]
    assert events[0][1]["status"] == "queued"
    assert time.monotonic() - started < 5


def test_events_of_a_finished_job_send_it_once_and_end(finished) -> None:
    client, job = finished
    response = client.get(f"/v1/jobs/{job['id']}/events")
    events = parse_events(response.text)
    assert [(name, data["status"]) for name, data in events] == [("job", "succeeded")]
