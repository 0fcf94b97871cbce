"""The REST client and the client CLI commands.

Most tests run against the real service (`api.main.create_app`, uvicorn on a loopback port in a
thread) whose job runner is scripted, so that a job's outcome (success, failure, a job that runs
until cancelled) is chosen by the test and takes well under a second. One slow test runs the
real pipeline end to end. The client's own logic that a healthy server never exercises (a
corrupted download, an event stream that is missing, odd error bodies) is driven through
`httpx.MockTransport`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from compressor.cli import main as cli
from compressor.client import (
    AuthError,
    ChecksumMismatch,
    Client,
    ClientError,
    ConflictError,
    ConnectionFailed,
    InsufficientStorage,
    Job,
    JobFailed,
    NotFoundError,
    RateLimitedError,
    RequestTooLargeError,
    ServerError,
    ValidationFailed,
    WaitTimeout,
)
from compressor.errors import CancelledError, DataError
from compressor.pipeline import Result
from compressor.runtime.progress import STAGES, ProgressEvent, overall_progress
from compressor.vocabulary import SUCCEEDED
from tests.support.network import free_port
from tests.support.tiny_models import make_pt2

KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"

# The scripted runner picks its behaviour from the job's `finetune.seed`.
SUCCEED, FAIL, RUN_UNTIL_CANCELLED, FAIL_NAMING_THE_FILES = 0, 1, 2, 3
# A report shaped like the pipeline's (a few of its sections).
REPORT = {
    "parameters": {"targeted_weights_before": 76288, "targeted_weights_after": 37864},
    "onnx_bytes": {"original": 309914, "artifact": 160000},
    "fidelity": {"final": {"logits": {"cosine": 0.9991, "relative_l2": 0.04,
                                      "top1_agreement": 0.98}}},
    "onnx_parity": {"passed": True, "max_abs_diff": {"logits": 8.9e-08}},
    "latency": {"original": {"batch_1_ms": 0.034}, "compressed": {"batch_1_ms": 0.021}},
    "data": {"synthetic": True},
}


def scripted_compress(model: Path, config: dict[str, Any], *, out_dir: Path,
                      data: Path | None = None, progress: Callable | None = None,
                      should_stop: Callable | None = None) -> Result:
    """Stand in for `compressor.compress`: walk the stages, then succeed, fail or block."""
    scenario = config["finetune"]["seed"]
    for stage in STAGES:
        progress(ProgressEvent(stage, 1.0, overall_progress(stage, 1.0)))
        time.sleep(0.05)
        if scenario == RUN_UNTIL_CANCELLED:
            while not should_stop():
                time.sleep(0.02)
            raise CancelledError("the job was cancelled")
    if scenario == FAIL:
        raise DataError("data: tensor 'x' has 3 columns, the model takes 32; fix the data file")
    if scenario == FAIL_NAMING_THE_FILES:  # as the core's loaders do: by the paths' names
        raise DataError(f"model {model.name}, data file {data.name if data else None}")
    out_dir = Path(out_dir)
    report = REPORT
    (out_dir / "model.onnx").write_bytes(hashlib.sha512(model.read_bytes()).digest() * 4096)
    (out_dir / "report.json").write_text(json.dumps(report))
    (out_dir / "job.log").write_text("scripted run\n")
    return Result(out_dir, out_dir / "model.onnx", out_dir / "report.json",
                  out_dir / "job.log", report)


@contextmanager
def serving(data_dir: Path, run_job: Callable | None, **settings: Any) -> Iterator[str]:
    """Serve the real app on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    from api.main import create_app
    from api.settings import Settings

    port = free_port()
    options = dict(data_dir=data_dir, api_keys=[KEY_A, KEY_B], host="127.0.0.1", port=port,
                   events_poll_s=0.05, progress_interval_s=0.0, cancel_poll_s=0.05,
                   queue_poll_s=0.05, worker_concurrency=4, max_jobs_in_flight=50)
    app = create_app(Settings(**{**options, **settings}), run_job=run_job)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def server(service_dir: Path) -> Iterator[str]:
    with serving(service_dir / "data", scripted_compress) as url:
        yield url


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pt2("mlp", tmp_path_factory.mktemp("model") / "mlp.pt2")


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server, api_key=KEY_A, timeout=30) as connected:
        yield connected


def scenario(seed: int) -> dict[str, Any]:
    return {"ratio": 0.5, "finetune": {"seed": seed, "steps": 1}}


# --- against the real service -------------------------------------------------------------------


def test_submit_wait_and_download_a_verified_artifact(
    client: Client, model_file: Path, tmp_path: Path
) -> None:
    sent: list[tuple[int, int]] = []
    job = client.submit(model_file, scenario(SUCCEED), on_upload=lambda *a: sent.append(a))
    assert job.status == "queued" and job.config["finetune"]["seed"] == SUCCEED
    assert sent[-1] == (model_file.stat().st_size, model_file.stat().st_size)

    seen: list[Job] = []
    done = client.wait(job.id, on_update=seen.append, timeout=60)
    assert done.status == "succeeded" and done.finished_at is not None
    assert done.report == REPORT
    progress = [j.progress for j in seen]
    assert progress == sorted(progress) and seen[-1].status == "succeeded"

    saved = client.download(job.id, "model.onnx", tmp_path)
    assert saved == tmp_path / "model.onnx"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == done.artifact("model.onnx").sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that records (Range, If-Range, status) of artifact requests."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str | None, str | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if "/artifacts/" in request.url.path:
            self.seen.append((request.headers.get("range"), request.headers.get("if-range"),
                              response.status_code))
        return response


def test_the_service_resumes_a_part_and_restarts_a_stale_one(
    server: str, model_file: Path, tmp_path: Path
) -> None:
    transport = RecordingTransport()
    with Client(server, api_key=KEY_A, transport=transport) as client:
        job = client.wait(client.submit(model_file, scenario(SUCCEED)).id, timeout=60)
        listed = job.artifact("model.onnx")
        whole = client.download(job.id, "model.onnx", tmp_path / "whole.onnx").read_bytes()
        etag = f'"{listed.sha256}"'
        # A part an interrupted earlier run left: resumed from its end.
        (tmp_path / "resumed.onnx.part").write_bytes(whole[:5000])
        (tmp_path / "resumed.onnx.part.etag").write_text(etag)
        assert client.download(job.id, "model.onnx", tmp_path / "resumed.onnx").read_bytes() == whole
        # A part of a file that changed since: the server sends the whole file instead.
        (tmp_path / "stale.onnx.part").write_bytes(b"x" * 5000)
        (tmp_path / "stale.onnx.part.etag").write_text('"' + "1" * 64 + '"')
        assert client.download(job.id, "model.onnx", tmp_path / "stale.onnx").read_bytes() == whole
    assert transport.seen == [(None, None, 200), ("bytes=5000-", etag, 206),
                              ("bytes=5000-", '"' + "1" * 64 + '"', 200)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.onnx", "stale.onnx",
                                                         "whole.onnx"]


def test_wait_follows_server_sent_events_without_polling(client: Client, model_file: Path) -> None:
    job = client.submit(model_file, scenario(SUCCEED))
    stages: list[str | None] = []
    # An hour between polls: only the event stream can bring the job home within the timeout.
    done = client.wait(job.id, on_update=lambda j: stages.append(j.stage),
                       poll_interval=3600, timeout=30)
    assert done.status == "succeeded"
    assert len(set(stages) & set(STAGES)) >= 2, stages  # intermediate stages arrived as events


def test_failed_job_raises_job_failed_with_the_servers_code(
    client: Client, model_file: Path
) -> None:
    job = client.submit(model_file, scenario(FAIL))
    with pytest.raises(JobFailed) as failed:
        client.wait(job.id, timeout=30)
    assert failed.value.code == "invalid_data" and failed.value.job.status == "failed"
    assert "fix the data file" in failed.value.message


def test_cancel_a_running_job_then_cancelling_again_conflicts(
    client: Client, model_file: Path
) -> None:
    job = client.submit(model_file, scenario(RUN_UNTIL_CANCELLED))
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).status == "cancelled"
    with pytest.raises(ConflictError) as conflict:
        client.cancel(job.id)
    assert conflict.value.status_code == 409 and "already cancelled" in conflict.value.message


def test_wait_timeout_leaves_the_job_running(client: Client, model_file: Path) -> None:
    job = client.submit(model_file, scenario(RUN_UNTIL_CANCELLED))
    try:
        with pytest.raises(WaitTimeout) as timed_out:
            client.wait(job.id, timeout=0.5)
        assert timed_out.value.job.status in ("queued", "running")
        assert client.get(job.id).status in ("queued", "running")
    finally:
        client.cancel(job.id)


def test_delete_removes_the_job(client: Client, model_file: Path) -> None:
    job = client.submit(model_file, scenario(SUCCEED))
    client.wait(job.id, timeout=30)
    client.delete(job.id)
    with pytest.raises(NotFoundError) as missing:
        client.get(job.id)
    assert missing.value.status_code == 404 and job.id in missing.value.message


def test_list_follows_pages_newest_first_and_filters_by_status(
    server: str, model_file: Path
) -> None:
    with Client(server, api_key=KEY_B) as tenant_b:  # a tenant of its own: only these jobs
        ids = [tenant_b.submit(model_file, scenario(SUCCEED)).id for _ in range(3)]
        for job_id in ids:
            tenant_b.wait(job_id, timeout=30)
        assert [j.id for j in tenant_b.list(page_size=1)] == ids[::-1]
        assert [j.id for j in tenant_b.list(limit=2, page_size=1)] == ids[:0:-1]
        assert [j.id for j in tenant_b.list(status="succeeded")] == ids[::-1]
        assert list(tenant_b.list(status="failed")) == []


def test_tenants_see_only_their_own_jobs(client: Client, server: str, model_file: Path) -> None:
    job = client.submit(model_file, scenario(SUCCEED))
    with Client(server, api_key=KEY_B) as other, pytest.raises(NotFoundError):
        other.get(job.id)


@pytest.mark.parametrize("api_key", [None, "not-a-key"])
def test_missing_or_wrong_key_raises_auth_error(server: str, api_key: str | None) -> None:
    with Client(server, api_key=api_key) as stranger, pytest.raises(AuthError) as refused:
        list(stranger.list())
    assert refused.value.status_code == 401 and refused.value.code and refused.value.message


def test_invalid_config_raises_validation_failed_naming_the_field(
    client: Client, model_file: Path
) -> None:
    with pytest.raises(ValidationFailed) as invalid:
        client.submit(model_file, {"finetune": {"steps": -1}})
    assert invalid.value.status_code == 422 and "finetune.steps" in invalid.value.message


def test_a_file_that_is_not_a_program_is_refused(client: Client, tmp_path: Path) -> None:
    pickle_file = tmp_path / "model.pt2"
    pickle_file.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle, not a zip archive
    with pytest.raises(ValidationFailed) as refused:
        client.submit(pickle_file)
    assert refused.value.status_code == 415 and "torch.export" in refused.value.message


def test_corrupted_artifact_raises_checksum_mismatch_and_saves_nothing(
    client: Client, model_file: Path, service_dir: Path, tmp_path: Path
) -> None:
    from api.jobs.folders import JobFolders

    job = client.wait(client.submit(model_file, scenario(SUCCEED)).id, timeout=30)
    stored = JobFolders(service_dir / "data").artifact_path(job.id, "model.onnx")
    stored.write_bytes(b"tampered" + stored.read_bytes()[8:])
    with pytest.raises(ChecksumMismatch) as mismatch:
        client.download(job.id, "model.onnx", tmp_path / "model.onnx")
    assert job.artifact("model.onnx").sha256 in mismatch.value.message
    assert list(tmp_path.iterdir()) == []


def test_upload_over_the_limit_raises_request_too_large(model_file: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.pt2"
    big.write_bytes(b"PK\x03\x04" + b"\x00" * (3 << 20))
    with serving(tmp_path / "data", scripted_compress, max_upload_bytes=1 << 20) as url, \
            Client(url, api_key=KEY_A) as small_server:
        with pytest.raises(RequestTooLargeError) as too_large:
            small_server.submit(big)
        assert too_large.value.status_code == 413
        assert small_server.submit(model_file).status == "queued"  # under the limit: accepted


def test_too_many_jobs_in_flight_raises_rate_limited(model_file: Path, tmp_path: Path) -> None:
    with serving(tmp_path / "data", scripted_compress, max_jobs_in_flight=2) as url, \
            Client(url, api_key=KEY_A) as busy:
        jobs = [busy.submit(model_file, scenario(RUN_UNTIL_CANCELLED)) for _ in range(2)]
        try:
            with pytest.raises(RateLimitedError) as limited:
                busy.submit(model_file, scenario(SUCCEED))
            assert limited.value.status_code == 429 and limited.value.retry_after > 0
        finally:
            for job in jobs:
                busy.cancel(job.id)


def test_unreachable_server_raises_connection_failed_with_the_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as nowhere, pytest.raises(ConnectionFailed) as failed:
        nowhere.get("some-job")
    assert url in failed.value.message and "COMPRESSOR_SERVER" in failed.value.message


def test_server_address_without_a_scheme_is_refused() -> None:
    with pytest.raises(ClientError, match="http://HOST:PORT"):
        Client("localhost:8000")


# --- the CLI against the real service ------------------------------------------------------------


def run_cli(server: str, *args: str, api_key: str | None = KEY_A) -> Any:
    env = {"COMPRESSOR_SERVER": server, "COMPRESSOR_API_KEY": api_key}
    result = CliRunner().invoke(cli, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def test_cli_submit_wait_and_save_the_model(server: str, model_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "plan.json"
    config.write_text(json.dumps(scenario(SUCCEED)))
    result = run_cli(server, "submit", str(model_file), "--config", str(config),
                     "-o", str(tmp_path / "out.onnx"))
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    with Client(server, api_key=KEY_A) as client:
        job = client.get(job_id)
    assert job.status == "succeeded"
    saved = (tmp_path / "out.onnx").read_bytes()
    assert hashlib.sha256(saved).hexdigest() == job.artifact("model.onnx").sha256
    assert f"Job {job_id} succeeded" in result.stderr
    assert "fidelity logits: cosine 0.9991" in result.stderr


def test_cli_submit_without_wait_prints_only_the_id(server: str, model_file: Path) -> None:
    result = run_cli(server, "submit", str(model_file), "--config", json.dumps(scenario(SUCCEED)))
    assert result.exit_code == 0, result.output
    with Client(server, api_key=KEY_A) as client:
        assert client.get(result.stdout.strip()).id == result.stdout.strip()


def test_cli_failed_job_exits_1_with_the_servers_message(server: str, model_file: Path) -> None:
    result = run_cli(server, "submit", str(model_file), "--wait", "--config",
                     json.dumps(scenario(FAIL)))
    assert result.exit_code == 1
    assert "failed (invalid_data)" in result.stderr and "fix the data file" in result.stderr


def test_cli_jobs_status_and_cancel(server: str, model_file: Path) -> None:
    with Client(server, api_key=KEY_A) as client:
        done = client.wait(client.submit(model_file, scenario(SUCCEED)).id, timeout=30)
        running = client.submit(model_file, scenario(RUN_UNTIL_CANCELLED))

    table = run_cli(server, "jobs", "--limit", "50")
    assert table.exit_code == 0 and done.id in table.stdout and running.id in table.stdout
    listed = run_cli(server, "jobs", "--status", "succeeded", "--json", "--limit", "50")
    assert done.id in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert running.id not in listed.stdout

    status = run_cli(server, "status", done.id)
    assert status.exit_code == 0
    assert "succeeded" in status.stdout and "artifact model.onnx" in status.stdout
    for label, value in [
        ("weights kept", "37,864 of 76,288 in the compressed layers (50%)"),
        ("onnx size", "156.2 KiB (original 302.7 KiB)"),
        ("fidelity logits", "cosine 0.9991, rel. L2 0.04, top-1 0.98"),
        ("onnx parity", "passed, max abs diff 8.9e-08"),
        ("latency batch 1", "0.021 ms (original 0.034 ms)"),
    ]:
        assert re.search(rf"^{label} +{re.escape(value)}$", status.stdout, re.M), status.stdout

    cancelled = run_cli(server, "cancel", running.id)
    assert cancelled.exit_code == 0 and running.id in cancelled.stdout
    again = run_cli(server, "cancel", done.id)
    assert again.exit_code == 1 and "already succeeded" in again.stderr


def test_cli_jobs_shows_a_finished_jobs_outcome_not_its_last_stage(
        server: str, model_file: Path) -> None:
    with Client(server, api_key=KEY_A) as client:
        done = client.wait(client.submit(model_file, scenario(SUCCEED)).id, timeout=30)
        failed_id = client.submit(model_file, scenario(FAIL)).id
        with pytest.raises(JobFailed):
            client.wait(failed_id, timeout=30)
        failed = client.get(failed_id)
    assert done.stage is not None and done.stage != SUCCEEDED  # the last stage it ran
    assert (done.raw["phase"], failed.raw["phase"]) == ("succeeded", "failed")  # the API's field
    table = run_cli(server, "jobs", "--limit", "50")
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows[done.id][1:3] == ["succeeded", "succeeded"]
    assert rows[failed_id][1:3] == ["failed", "failed"]
    assert re.search(r"^stage +succeeded$", run_cli(server, "status", done.id).stdout, re.M)


def test_cli_submit_takes_set_and_inline_json_like_compress(server: str, model_file: Path,
                                                            tmp_path: Path) -> None:
    result = run_cli(server, "submit", str(model_file), "--config",
                     json.dumps({"ratio": 0.3, **scenario(SUCCEED)}),
                     "--set", "ratio=0.25", "--set", "finetune.steps=2")
    assert result.exit_code == 0, result.output
    with Client(server, api_key=KEY_A) as client:
        config = client.get(result.stdout.strip()).config
    assert config["ratio"] == 0.25 and config["finetune"]["steps"] == 2
    only_set = run_cli(server, "submit", str(model_file), "--set", "finetune.seed=0")
    assert only_set.exit_code == 0, only_set.output
    bad = run_cli(server, "submit", str(model_file), "--set", "ratio")
    assert bad.exit_code == 2 and "is not KEY=VALUE" in bad.stderr


def test_a_jobs_error_names_the_files_as_the_user_sent_them(client: Client, model_file: Path,
                                                           tmp_path: Path) -> None:
    model, data = tmp_path / "pickled.pt2", tmp_path / "wrongnames.safetensors"
    model.write_bytes(model_file.read_bytes())
    data.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a safetensors header
    with pytest.raises(JobFailed) as failed:
        client.wait(client.submit(model, scenario(FAIL_NAMING_THE_FILES), data).id, timeout=30)
    assert failed.value.message.endswith(": model pickled.pt2, data file wrongnames.safetensors")


def test_cli_download_saves_an_artifact(server: str, model_file: Path, tmp_path: Path) -> None:
    with Client(server, api_key=KEY_A) as client:
        job = client.wait(client.submit(model_file, scenario(SUCCEED)).id, timeout=30)
    result = run_cli(server, "download", job.id, "report.json", "-o", f"{tmp_path}/new/")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "new" / "report.json").read_text()) == job.report


@pytest.mark.parametrize(
    ("args", "api_key", "expected"),
    [
        (["jobs"], "wrong-key", "pass --api-key or set COMPRESSOR_API_KEY"),
        (["status", "no-such-job"], KEY_A, "no-such-job"),
        (["jobs"], None, "HTTP 401"),
    ],
)
def test_cli_errors_exit_1_with_a_message(
    server: str, args: list[str], api_key: str | None, expected: str
) -> None:
    result = run_cli(server, *args, api_key=api_key)
    assert result.exit_code == 1 and expected in result.stderr, result.output


def test_cli_unreachable_server_says_which_url_and_how_to_fix_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(url, "jobs")
    assert result.exit_code == 1
    assert url in result.stderr and "--server / COMPRESSOR_SERVER" in result.stderr


def test_cli_rejects_a_config_that_is_not_json(tmp_path: Path, model_file: Path) -> None:
    broken = tmp_path / "plan.json"
    broken.write_text("{ratio: 0.5}")
    result = run_cli("http://127.0.0.1:9", "submit", str(model_file), "--config", str(broken))
    assert result.exit_code == 2 and "not valid JSON" in result.stderr


# --- the client's own logic, through httpx.MockTransport ---------------------------------------

JOB_ID = "0123abcd"


def job_json(**fields: Any) -> dict[str, Any]:
    return {"id": JOB_ID, "status": "queued", "stage": None, "progress": 0.0,
            "created_at": "2025-01-01T12:00:00Z", "started_at": None, "finished_at": None,
            "config": {}, "error": None, "report": None, "artifacts": [], **fields}


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://service.test", api_key="k", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(401, AuthError), (403, AuthError), (404, NotFoundError), (409, ConflictError),
     (413, RequestTooLargeError), (415, ValidationFailed), (422, ValidationFailed),
     (429, RateLimitedError), (400, ClientError), (500, ServerError), (503, ServerError),
     (507, InsufficientStorage)],
)
def test_errors_are_typed_by_status_and_carry_the_servers_code_and_message(
    status: int, error_type: type[ClientError]
) -> None:
    body = {"error": {"code": "some_code", "message": "what to do about it"}}
    with mock_client(lambda request: httpx.Response(status, json=body)) as client, \
            pytest.raises(error_type) as raised:
        client.get(JOB_ID)
    assert type(raised.value) is error_type
    if status == 429:
        assert raised.value.retry_after is None  # no Retry-After header was sent
    assert (raised.value.status_code, raised.value.code, raised.value.message) == (
        status, "some_code", "what to do about it")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(422, json={"detail": [{"loc": ["query", "limit"], "msg": "too big"}]}),
         "query.limit: too big"),
        (httpx.Response(404, json={"detail": "Not Found"}), "Not Found"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), "<html>Bad Gateway</html>"),
        (httpx.Response(500), "GET http://service.test/v1/jobs/0123abcd answered HTTP 500"),
    ],
)
def test_error_bodies_that_are_not_ours_still_give_a_message(
    response: httpx.Response, message: str
) -> None:
    with mock_client(lambda request: response) as client, pytest.raises(ClientError) as raised:
        client.get(JOB_ID)
    assert raised.value.message == message and raised.value.code is None


def test_a_keyless_upload_to_a_keyed_server_is_refused_before_its_body_is_sent(
        tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    model.write_bytes(b"PK\x03\x04" + bytes(1 << 20))
    requests: list[tuple[str, int]] = []

    def keyed_server(request: httpx.Request) -> httpx.Response:
        requests.append((request.method, len(request.read())))
        if "authorization" not in request.headers:
            return httpx.Response(401, json={"error": {"code": "unauthorized",
                                                       "message": "missing API key"}})
        return httpx.Response(202, json=job_json())

    transport = httpx.MockTransport(keyed_server)
    with Client("http://service.test", transport=transport) as client, \
            pytest.raises(AuthError, match="missing API key"):
        client.submit(model)
    assert requests == [("GET", 0)]  # the credentials were checked; no upload was started


def test_submit_streams_the_files_in_chunks_with_upload_progress(tmp_path: Path) -> None:
    model, data = tmp_path / "m.pt2", tmp_path / "d.safetensors"
    model.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 1200)  # ~300 KiB: several chunks
    data.write_bytes(b"tensors" * 100)
    received: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        received["body"] = request.read()
        received["auth"] = request.headers["authorization"]
        return httpx.Response(202, json=job_json(), headers={"Location": f"/v1/jobs/{JOB_ID}"})

    progress: list[tuple[int, int]] = []
    with mock_client(handler) as client:
        job = client.submit(model, {"ratio": 0.3}, data, on_upload=lambda *a: progress.append(a))
    total = model.stat().st_size + data.stat().st_size
    assert job.id == JOB_ID and received["auth"] == "Bearer k"
    assert model.read_bytes() in received["body"] and data.read_bytes() in received["body"]
    assert b'name="config"\r\n\r\n{"ratio": 0.3}' in received["body"]
    assert len(progress) >= 5 and progress[-1] == (total, total)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)


def test_list_sends_cursors_and_stops_at_the_limit() -> None:
    pages = {None: (["j5", "j4"], "c1"), "c1": (["j3", "j2"], "c2"), "c2": (["j1"], None)}
    asked: list[tuple[str | None, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        asked.append((cursor, request.url.params["limit"]))
        ids, next_cursor = pages[cursor]
        return httpx.Response(200, json={"data": [job_json(id=i) for i in ids],
                                         "next_cursor": next_cursor})

    with mock_client(handler) as client:
        assert [j.id for j in client.list()] == ["j5", "j4", "j3", "j2", "j1"]
        asked.clear()
        assert [j.id for j in client.list(limit=3)] == ["j5", "j4", "j3"]
    assert asked == [(None, "3"), ("c1", "1")]


def artifact_server(body: bytes, etag: str | None, listed_sha: str | None,
                    length: int | None = None) -> Callable[[httpx.Request], httpx.Response]:
    """Serve a finished job listing `model.onnx` with `listed_sha`, and its bytes."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts/model.onnx"):
            headers = {"ETag": etag} if etag else {}
            headers["Content-Length"] = str(len(body) if length is None else length)
            return httpx.Response(200, content=body, headers=headers)
        artifacts = [{"name": "model.onnx", "size": len(body), "sha256": listed_sha,
                      "url": "..."}] if listed_sha else []
        return httpx.Response(200, json=job_json(status="succeeded", artifacts=artifacts))
    return handler


BODY = b"onnx bytes" * 1000
GOOD = hashlib.sha256(BODY).hexdigest()
BAD = hashlib.sha256(b"something else").hexdigest()


@pytest.mark.parametrize(
    ("etag", "listed"),
    [(f'"{GOOD}"', GOOD), (f'"{GOOD}"', None), (None, GOOD), (f'W/"sha256:{GOOD}"', None)],
)
def test_download_accepts_a_matching_etag_or_listed_sha256(
    tmp_path: Path, etag: str | None, listed: str | None
) -> None:
    with mock_client(artifact_server(BODY, etag, listed)) as client:
        saved = client.download(JOB_ID, "model.onnx", tmp_path / "nested" / "model.onnx")
    assert saved.read_bytes() == BODY
    assert [p.name for p in saved.parent.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize(
    ("etag", "listed"), [(f'"{BAD}"', None), (None, BAD), (f'"{GOOD}"', BAD), (f'"{BAD}"', GOOD)]
)
def test_download_mismatch_raises_and_leaves_nothing(
    tmp_path: Path, etag: str | None, listed: str | None
) -> None:
    with mock_client(artifact_server(BODY, etag, listed)) as client, \
            pytest.raises(ChecksumMismatch, match="nothing was saved"):
        client.download(JOB_ID, "model.onnx", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_into_a_new_folder_named_with_a_trailing_slash(tmp_path: Path) -> None:
    with mock_client(artifact_server(BODY, f'"{GOOD}"', None)) as client:
        saved = client.download(JOB_ID, "model.onnx", f"{tmp_path}/new/")
    assert saved == tmp_path / "new" / "model.onnx" and saved.read_bytes() == BODY


def test_download_without_any_sha256_needs_verify_false(tmp_path: Path) -> None:
    with mock_client(artifact_server(BODY, None, None)) as client:
        with pytest.raises(ChecksumMismatch, match="verify=False"):
            client.download(JOB_ID, "model.onnx", tmp_path)
        assert list(tmp_path.iterdir()) == []
        assert client.download(JOB_ID, "model.onnx", tmp_path, verify=False).read_bytes() == BODY


def test_download_shorter_than_its_content_length_is_retried_then_kept_to_resume(
    tmp_path: Path, no_retry_wait: None
) -> None:
    handler = artifact_server(BODY, f'"{GOOD}"', None, length=len(BODY) + 10)
    with mock_client(handler) as client, pytest.raises(ConnectionFailed, match="broke off 3 times"):
        client.download(JOB_ID, "model.onnx", tmp_path, retries=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.part", "model.onnx.part.etag"]


# --- resumable downloads -------------------------------------------------------------------------

BIG = hashlib.sha512(b"weights").digest() * 50_000  # 3.2 MB: several of the client's 1 MiB chunks
BIG_SHA = hashlib.sha256(BIG).hexdigest()


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry a dropped download at once."""
    monkeypatch.setattr("compressor.client.downloads.RETRY_WAIT_S", 0.0)


class BrokenStream(httpx.SyncByteStream):
    """A body that sends `data` and then loses the connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


class RangeServer:
    """Serve a finished job's artifacts with Range and If-Range, as the service does.

    `files` maps a name to its bytes; the first `drops` bodies break off after `cut` bytes;
    `requests` records every artifact request.
    """

    def __init__(self, files: dict[str, bytes], drops: int = 0, cut: int = 1_200_000) -> None:
        self.files, self.drops, self.cut = files, drops, cut
        self.requests: list[httpx.Request] = []

    def etag(self, name: str) -> str:
        return f'"{hashlib.sha256(self.files[name]).hexdigest()}"'

    def __call__(self, request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        if "/artifacts/" not in request.url.path:
            artifacts = [{"name": n, "size": len(b), "sha256": self.etag(n).strip('"'),
                          "url": f"/v1/jobs/{JOB_ID}/artifacts/{n}"} for n, b in self.files.items()]
            return httpx.Response(200, json=job_json(status="succeeded", artifacts=artifacts))
        self.requests.append(request)
        body, etag = self.files[name], self.etag(name)
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        status, start = 200, 0
        asked, if_range = request.headers.get("range"), request.headers.get("if-range")
        if asked and if_range in (None, etag):
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                return httpx.Response(416, headers={"Content-Range": f"bytes */{len(body)}"},
                                      json={"error": {"code": "range_not_satisfiable",
                                                      "message": "past the end"}})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        rest = body[start:]
        headers["Content-Length"] = str(len(rest))
        if self.drops:
            self.drops -= 1
            return httpx.Response(status, headers=headers, stream=BrokenStream(rest[:self.cut]))
        return httpx.Response(status, headers=headers, content=rest)


def test_a_connection_that_drops_mid_body_is_resumed_with_range(
    tmp_path: Path, no_retry_wait: None
) -> None:
    server = RangeServer({"model.onnx": BIG}, drops=1)
    progress: list[tuple[int, int]] = []
    with mock_client(server) as client:
        saved = client.download(JOB_ID, "model.onnx", tmp_path,
                                on_progress=lambda *a: progress.append(a))
    assert saved.read_bytes() == BIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    first, second = server.requests
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={server.cut}-"
    assert second.headers["if-range"] == f'"{BIG_SHA}"'
    assert progress[-1] == (len(BIG), len(BIG))


def test_a_download_that_keeps_dropping_keeps_its_part_and_the_next_call_resumes(
    tmp_path: Path, no_retry_wait: None
) -> None:
    server = RangeServer({"model.onnx": BIG}, drops=2, cut=1_000_000)
    with mock_client(server) as client:
        with pytest.raises(ConnectionFailed, match="download it again to resume"):
            client.download(JOB_ID, "model.onnx", tmp_path, retries=1)
        part = tmp_path / "model.onnx.part"
        assert part.read_bytes() == BIG[:2_000_000] and not (tmp_path / "model.onnx").exists()
        saved = client.download(JOB_ID, "model.onnx", tmp_path)  # a later run
    assert saved.read_bytes() == BIG and not part.exists()
    assert [r.headers.get("range") for r in server.requests] == [
        None, "bytes=1000000-", "bytes=2000000-"]


def test_a_stale_part_whose_etag_changed_starts_over(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.part").write_bytes(b"an older model's first bytes" * 1000)
    (tmp_path / "model.onnx.part.etag").write_text('"' + "0" * 64 + '"')
    server = RangeServer({"model.onnx": BIG})
    with mock_client(server) as client:
        saved = client.download(JOB_ID, "model.onnx", tmp_path)
    assert saved.read_bytes() == BIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    [request] = server.requests  # asked for the rest of the old file, got the whole new one
    assert request.headers["if-range"] == '"' + "0" * 64 + '"'


def test_a_part_without_its_etag_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.part").write_bytes(b"junk" * 100)
    server = RangeServer({"model.onnx": BIG})
    with mock_client(server) as client:
        assert client.download(JOB_ID, "model.onnx", tmp_path).read_bytes() == BIG
    assert "range" not in server.requests[0].headers


def test_a_resumed_part_with_wrong_bytes_fails_the_checksum_and_is_deleted(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.part").write_bytes(b"\0" * 500_000)  # not BIG's first bytes
    (tmp_path / "model.onnx.part.etag").write_text(f'"{BIG_SHA}"')
    with mock_client(RangeServer({"model.onnx": BIG})) as client, \
            pytest.raises(ChecksumMismatch, match="nothing was saved"):
        client.download(JOB_ID, "model.onnx", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_part_longer_than_the_file_is_416_and_starts_over(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.part").write_bytes(BIG + b"extra")
    (tmp_path / "model.onnx.part.etag").write_text(f'"{BIG_SHA}"')
    server = RangeServer({"model.onnx": BIG})
    with mock_client(server) as client:
        assert client.download(JOB_ID, "model.onnx", tmp_path).read_bytes() == BIG
    assert [r.headers.get("range") for r in server.requests] == [f"bytes={len(BIG) + 5}-", None]


def test_a_complete_part_is_checked_and_renamed_without_a_request(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.part").write_bytes(BIG)
    (tmp_path / "model.onnx.part.etag").write_text(f'"{BIG_SHA}"')
    server = RangeServer({"model.onnx": BIG})
    with mock_client(server) as client:
        assert client.download(JOB_ID, "model.onnx", tmp_path).read_bytes() == BIG
    assert server.requests == []


def test_model_onnx_brings_its_external_data_file_along(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 9000
    server = RangeServer({"model.onnx": b"graph" * 100, "model.onnx.data": weights})
    progress: list[tuple[int, int]] = []
    with mock_client(server) as client:
        saved = client.download(JOB_ID, "model.onnx", tmp_path / "small.onnx",
                                on_progress=lambda *a: progress.append(a))
    assert saved == tmp_path / "small.onnx" and saved.read_bytes() == b"graph" * 100
    # model.onnx names its data file, so the data file keeps its name beside the model.
    assert (tmp_path / "model.onnx.data").read_bytes() == weights
    assert [r.url.path.rsplit("/", 1)[-1] for r in server.requests] == [
        "model.onnx.data", "model.onnx"]
    total = len(weights) + 500
    assert progress[-1] == (total, total) and all(t == total for _, t in progress)
    assert [got for got, _ in progress] == sorted(got for got, _ in progress)


def test_other_artifacts_come_alone(tmp_path: Path) -> None:
    server = RangeServer({"model.onnx": b"graph", "model.onnx.data": b"w" * 10,
                          "report.json": b"{}"})
    with mock_client(server) as client:
        client.download(JOB_ID, "report.json", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def scripted_job_server(events: str | None, polls: list[dict[str, Any]]) -> Callable:
    """Answer GET job with `polls` in turn (the last repeats) and the events with `events`."""
    answers = iter(polls)
    last: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal last
        if request.url.path.endswith("/events"):
            if events is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, text=events, headers={"content-type": "text/event-stream"})
        last = next(answers, last)
        return httpx.Response(200, json=last)
    return handler


def test_wait_applies_event_stream_updates_then_reads_the_finished_job() -> None:
    def event(**fields: Any) -> str:
        return f"event: job\nid: 1\ndata: {json.dumps(job_json(**fields))}\n\n"

    stream = (": keep-alive\n\n" + event(status="running", stage="planning", progress=0.1)
              + event(status="running", stage="finetuning", progress=0.5)
              + event(status="succeeded", stage="verifying", progress=1.0))
    final = job_json(status="succeeded", stage="verifying", progress=1.0,
                     report={"ok": True})
    seen: list[tuple[str, str | None]] = []
    handler = scripted_job_server(stream, [job_json(), final])
    with mock_client(handler) as client:
        done = client.wait(JOB_ID, on_update=lambda j: seen.append((j.status, j.stage)))
    assert seen == [("queued", None), ("running", "planning"), ("running", "finetuning"),
                    ("succeeded", "verifying")]
    assert done.report == {"ok": True}


def test_wait_polls_when_the_server_has_no_event_stream() -> None:
    polls = [job_json(), job_json(status="running", stage="exporting", progress=0.8),
             job_json(status="failed", stage="verifying", progress=0.9,
                      error={"code": "verification_failed", "message": "outputs differ"})]
    with mock_client(scripted_job_server(None, polls)) as client, \
            pytest.raises(JobFailed) as failed:
        client.wait(JOB_ID, poll_interval=0.01, timeout=10)
    assert failed.value.code == "verification_failed"
    assert str(failed.value) == f"job {JOB_ID} failed (verification_failed): outputs differ"


def test_job_from_json_parses_times_errors_and_artifacts() -> None:
    job = Job.from_json(job_json(
        status="failed", finished_at="2025-01-01T12:05:00Z",
        error={"code": "timeout", "message": "raise timeout_s"},
        artifacts=[{"name": "job.log", "size": 10, "sha256": GOOD, "url": "/x"}],
    ))
    assert job.finished and job.error.code == "timeout"
    assert (job.finished_at - job.created_at).total_seconds() == 300
    assert job.artifact("job.log").sha256 == GOOD and job.artifact("model.onnx") is None
    with pytest.raises(ClientError, match="not a job"):
        Job.from_json({"detail": "oops"})


# --- the real pipeline, end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_real_job_produces_an_onnx_model_that_onnxruntime_runs(
    model_file: Path, tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime

    with serving(tmp_path / "data", None, worker_concurrency=1) as url, \
            Client(url, api_key=KEY_A) as client:
        job = client.submit(model_file, {"ratio": 0.5, "finetune": {"steps": 5}})
        done = client.wait(job.id, timeout=300)
        saved = client.download(job.id, "model.onnx", tmp_path)
    assert done.status == "succeeded"
    session = onnxruntime.InferenceSession(str(saved))
    (output,) = session.run(None, {"x": np.random.rand(3, 32).astype(np.float32)})
    assert output.shape == (3, 10)
