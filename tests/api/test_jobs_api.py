"""`/v1/jobs` through HTTP with fast job functions: submit, read, list, cancel, delete, 429."""

from __future__ import annotations

import time
from pathlib import Path

from compressor.config import FinetuneConfig
from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job


def submit(client, model: Path, config: str | None = None, headers=None):
    """POST a job with `model` (and `config`); return the response."""
    data = {"config": config} if config is not None else None
    files = {"model": ("model.pt2", model.read_bytes(), "application/octet-stream")}
    return client.post("/v1/jobs", files=files, data=data, headers=headers)


def test_submit_answers_202_with_location_and_the_filled_config(make_client, fake_pt2) -> None:
    client = make_client(FakeJob(0.0))
    response = submit(client, fake_pt2, '{"ratio": 0.25, "finetune": {"steps": 5}}')
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert job["config"]["ratio"] == 0.25
    assert job["config"]["finetune"]["steps"] == 5
    assert job["config"]["finetune"]["lr"] == FinetuneConfig().lr  # defaults filled
    assert job["config"]["export"]["form"] == "dense"
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"] == 1.0 and done["stage"] == "reporting"  # the last, not the last sent
    assert done["started_at"] and done["finished_at"] and done["attempts"] == 1
    assert [a["name"] for a in done["artifacts"]] == ["model.onnx", "report.json", "job.log"]
    assert done["report"]["fake"] is True


def test_submit_without_config_uses_every_default(make_client, fake_pt2) -> None:
    client = make_client(FakeJob(0.0), embedded_worker=False)
    job = submit(client, fake_pt2).json()
    assert job["config"]["method"]["name"] == "lowrank" and job["config"]["ratio"] == 0.5


def test_a_job_keeps_the_model_files_name_without_its_folders(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    for sent, kept in [("C:\\models\\my model.pt2", "my model.pt2"), ("../up/m.pt2", "m.pt2")]:
        job = client.post("/v1/jobs", files={"model": (sent, fake_pt2.read_bytes())}).json()
        assert job["model_name"] == kept
        assert client.get(f"/v1/jobs/{job['id']}").json()["model_name"] == kept


def test_listing_is_newest_first_with_an_opaque_cursor(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    ids = [submit(client, fake_pt2).json()["id"] for _ in range(5)]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = client.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [j["id"] for j in second["data"] + third["data"]] == ids[::-1][2:]
    assert third["next_cursor"] is None
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]


def test_listing_rejects_bad_parameters_naming_them(make_client) -> None:
    client = make_client(embedded_worker=False)
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 1000}, "limit"),
        ({"status": "done"}, "status"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ):
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 422, params
        error = response.json()["error"]
        assert field in error["message"]
        assert error["details"][0]["field"] == field


def test_unknown_job_is_404_with_a_hint(make_client) -> None:
    client = make_client(embedded_worker=False)
    for method, path in (
        ("GET", "/v1/jobs/nope"),
        ("POST", "/v1/jobs/nope/cancel"),
        ("DELETE", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/artifacts/model.onnx"),
        ("GET", "/v1/jobs/nope/events"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"] == {
            "code": "not_found", "message": "no job 'nope'; list your jobs with GET /v1/jobs"
        }


def test_cancel_a_queued_job_takes_effect_at_once(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    job_id = submit(client, fake_pt2).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]["message"]


def test_cancel_a_running_job_stops_it_within_seconds(make_client, fake_pt2) -> None:
    fake = FakeJob(60.0)
    client = make_client(fake)
    job_id = submit(client, fake_pt2).json()["id"]
    wait_for_job(client, job_id, ("running",))
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    job = wait_for_job(client, job_id, timeout=5)
    assert job["status"] == "cancelled"
    assert job["error"]["code"] == "cancelled"


def test_cancel_a_finished_job_is_409(make_client, fake_pt2) -> None:
    client = make_client(FakeJob(0.0))
    job_id = submit(client, fake_pt2).json()["id"]
    wait_for_job(client, job_id)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_finished"


def test_delete_removes_files_and_record(make_client, fake_pt2, data_dir) -> None:
    client = make_client(FakeJob(0.0))
    job_id = submit(client, fake_pt2).json()["id"]
    wait_for_job(client, job_id)
    assert (data_dir / "jobs" / job_id / "out" / "model.onnx").is_file()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not (data_dir / "jobs" / job_id).exists()
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_delete_a_running_job_cancels_it_first(make_client, fake_pt2, data_dir) -> None:
    fake = FakeJob(60.0)
    client = make_client(fake)
    job_id = submit(client, fake_pt2).json()["id"]
    wait_for_job(client, job_id, ("running",))
    started = time.monotonic()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert time.monotonic() - started < 5
    time.sleep(0.3)  # the worker settles after the row is gone
    assert not (data_dir / "jobs" / job_id).exists()
    assert client.get("/v1/jobs").json()["data"] == []


def test_too_many_jobs_in_flight_is_429_and_stores_nothing(
    make_client, fake_pt2, data_dir
) -> None:
    client = make_client(embedded_worker=False, max_jobs_in_flight=2)
    assert [submit(client, fake_pt2).status_code for _ in range(2)] == [202, 202]
    response = submit(client, fake_pt2)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "too_many_jobs" and "2 jobs queued or running" in error["message"]
    assert response.headers["retry-after"]
    assert len(list((data_dir / "jobs").iterdir())) == 2
    first = client.get("/v1/jobs").json()["data"][-1]["id"]
    client.post(f"/v1/jobs/{first}/cancel")
    assert submit(client, fake_pt2).status_code == 202  # a finished job frees a slot


def test_unknown_route_answers_the_json_error_shape(make_client) -> None:
    client = make_client(embedded_worker=False)
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = client.put("/v1/jobs")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_the_job_schemas_and_the_upload(make_client) -> None:
    schema = make_client(embedded_worker=False).get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("JobPublic", "JobsPublic", "ArtifactPublic", "ErrorBody"):
        assert name in components
    upload = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["required"] == ["model"]
    assert "429" in schema["paths"]["/v1/jobs"]["post"]["responses"]
