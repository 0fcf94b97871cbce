"""Every bad submission gets a fitting 4xx naming the problem, and leaves nothing on disk."""

from __future__ import annotations

import errno
import io
import json
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.jobs.folders import UploadSink
from compressor.config import CompressionConfig
from compressor.errors import ResourceError
from compressor.load.stage import job_disk_bytes
from compressor.runtime.memory import format_bytes
from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job

MIB = 1 << 20


def jobs_on_disk(data_dir: Path) -> list[Path]:
    """Return every file under the data directory's jobs folder (not the links to them)."""
    return [p for p in (data_dir / "jobs").rglob("*") if p.is_file() and not p.is_symlink()]


def zip_bytes(size: int) -> bytes:
    """Return a zip archive of about `size` bytes (stored, not compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data/0", b"\0" * size)
    return buffer.getvalue()


def safetensors_bytes() -> bytes:
    """Return a minimal .safetensors file with one float32 tensor `x` of shape (2, 32)."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 256]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * 256


@pytest.fixture
def client(make_client):
    """An app with a 1 MiB upload limit whose jobs never run."""
    return make_client(embedded_worker=False, max_upload_bytes=MIB)


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        ('{"ratio": 2}', ["ratio"]),
        ('{"finetune": {"steps": -1, "lr": 0}}', ["finetune.steps", "finetune.lr"]),
        ('{"method": "prune"}', ["method"]),
        ('{"export": {"form": "sparse"}}', ["export.form"]),
        ('{"rank": 3}', ["rank"]),
        ('{"timeout_s": "soon"}', ["timeout_s"]),
    ],
)
def test_bad_config_values_are_422_naming_each_field(
    client, fake_pt2, data_dir, config, fields
) -> None:
    response = client.post(
        "/v1/jobs", data={"config": config}, files={"model": ("m.pt2", fake_pt2.read_bytes())}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_config"
    assert [d["field"] for d in error["details"]] == fields
    for field in fields:
        assert f"{field}:" in error["message"]
    assert jobs_on_disk(data_dir) == []


def test_config_that_is_not_json_is_422(client, fake_pt2, data_dir) -> None:
    response = client.post(
        "/v1/jobs", data={"config": "{ratio: 0.5"}, files={"model": ("m.pt2", fake_pt2.read_bytes())}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_config"
    assert "not valid JSON" in response.json()["error"]["message"]
    assert jobs_on_disk(data_dir) == []


def test_config_after_the_model_is_checked_and_the_model_deleted(
    client, fake_pt2, data_dir
) -> None:
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt2\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + fake_pt2.read_bytes() + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n"
        f'{{"ratio": -1}}\r\n--{boundary}--\r\n'
    ).encode()
    response = client.post(
        "/v1/jobs", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "ratio"
    assert jobs_on_disk(data_dir) == []


def test_config_may_be_sent_as_a_file(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    response = client.post(
        "/v1/jobs",
        files={
            "config": ("config.json", b'{"ratio": 0.3}', "application/json"),
            "model": ("m.pt2", fake_pt2.read_bytes()),
        },
    )
    assert response.status_code == 202
    assert response.json()["config"]["ratio"] == 0.3


def test_missing_model_is_422_naming_it(client, data_dir) -> None:
    response = client.post("/v1/jobs", files={"config": (None, "{}")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert "no `model` file" in error["message"]
    assert error["details"] == [{"field": "model", "message": "field required"}]


@pytest.mark.parametrize(
    ("content", "status", "phrase"),
    [
        (b"\x80\x02}q\x00.", 415, "torch.export.save"),  # a legacy pickle
        (b"ONNX-ish bytes that are no zip", 415, "'model.pt' is not a .pt2 program"),
        (b"", 422, "the model file 'model.pt' is empty"),
        (b"PK", 415, "not a .pt2 program"),
    ],
)
def test_wrong_model_type_says_how_to_export(client, data_dir, content, status, phrase) -> None:
    response = client.post("/v1/jobs", files={"model": ("model.pt", content)})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert phrase in error["message"] and "Hugging Face model folder" in error["message"]
    assert error["code"] == "invalid_model"  # what `compressor compress` says of the same file
    assert jobs_on_disk(data_dir) == []


def test_data_file_must_be_safetensors_or_npz(client, fake_pt2, data_dir) -> None:
    response = client.post(
        "/v1/jobs",
        files={"model": ("m.pt2", fake_pt2.read_bytes()), "data": ("d.csv", b"x,y\n1,2\n")},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "invalid_data"
    assert "'d.csv' is neither .safetensors nor .npz" in response.json()["error"]["message"]
    assert jobs_on_disk(data_dir) == []


@pytest.mark.parametrize(("data", "suffix"), [(safetensors_bytes(), ".safetensors"),
                                               (zip_bytes(10), ".npz")])
def test_data_file_reaches_the_job_by_its_format(make_client, fake_pt2, data, suffix) -> None:
    fake = FakeJob(0.0)
    client = make_client(fake)
    response = client.post(
        "/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes()), "data": ("d.bin", data)}
    )
    assert response.status_code == 202
    wait_for_job(client, response.json()["id"])
    assert fake.calls[0]["data"].name == f"d.bin{suffix}"  # as sent, with its format's suffix


def test_not_multipart_is_415(client) -> None:
    response = client.post("/v1/jobs", json={"model": "base64?"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "phrase"),
    [
        ({"weights": ("w.pt2", b"PK\x03\x04")}, "unknown form field 'weights'"),
        ([("model", ("a.pt2", b"PK\x03\x04xxxxx")), ("model", ("b.pt2", b"PK\x03\x04xxxxx"))],
         "sent twice"),
    ],
)
def test_unexpected_form_fields_are_422(client, data_dir, files, phrase) -> None:
    response = client.post("/v1/jobs", files=files)
    assert response.status_code == 422
    assert phrase in response.json()["error"]["message"]
    assert jobs_on_disk(data_dir) == []


@pytest.mark.parametrize(
    "body",
    [
        b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nPK\x03\x04abcdefgh",
        b"garbage without any boundary",
        b"--x\r\nno-colon-header\r\n\r\nPK\x03\x04\r\n--x--\r\n",
    ],
)
def test_malformed_multipart_is_a_4xx_never_a_500(client, data_dir, body) -> None:
    response = client.post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]
    assert jobs_on_disk(data_dir) == []


def test_oversized_upload_is_413_before_reading_and_leaves_nothing(client, data_dir) -> None:
    response = client.post("/v1/jobs", files={"model": ("m.pt2", zip_bytes(3 * MIB))})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "COMPRESSOR_MAX_UPLOAD_BYTES" in error["message"]
    assert jobs_on_disk(data_dir) == []


def test_oversized_stream_without_length_is_cut_off_early(client, data_dir) -> None:
    sent = 0
    total = 256 * MIB

    def body() -> Iterator[bytes]:
        nonlocal sent
        boundary_head = (
            b"--x\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt2\"\r\n\r\n"
            b"PK\x03\x04"
        )
        yield boundary_head
        chunk = b"\0" * (256 << 10)
        while sent < total:
            sent += len(chunk)
            yield chunk
        yield b"\r\n--x--\r\n"

    response = client.post(
        "/v1/jobs", content=body(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413
    assert sent < total / 4, f"the server read {sent} bytes before answering"
    assert jobs_on_disk(data_dir) == []


def test_an_upload_just_under_the_limit_is_accepted(client, data_dir) -> None:
    response = client.post("/v1/jobs", files={"model": ("m.pt2", zip_bytes(MIB - 4096))})
    assert response.status_code == 202
    [stored] = jobs_on_disk(data_dir)
    assert stored.name == "model.pt2" and stored.stat().st_size > MIB - 4096
    # the job reads it by the name it was sent as, so that its messages name the user's file
    assert (stored.parent / "sent" / "model.pt2" / "m.pt2").resolve() == stored.resolve()


# --- room on the data directory's disk ---------------------------------------------------------

GIB = 1 << 30


def disk_with_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """Make the data directory's disk report `free` bytes free."""
    monkeypatch.setattr(
        "api.jobs.folders.shutil.disk_usage",
        lambda path: shutil._ntuple_diskusage(100 * GIB, 100 * GIB - free, free),
    )


def test_an_upload_the_disk_has_no_room_for_is_507_before_storing(
    client, data_dir, monkeypatch
) -> None:
    disk_with_free(monkeypatch, GIB + MIB)  # the 1 GiB reserve, and 1 MiB more
    body = zip_bytes(512 << 10)
    response = client.post("/v1/jobs", files={"model": ("m.pt2", body)})
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "insufficient_resources"
    message = error["message"]
    declared = int(response.request.headers["content-length"])
    needed = 3 * declared + GIB  # the upload, twice it for the artifacts, the reserve
    assert f"has 1.0 GiB ({GIB + MIB} bytes) free" in message
    assert f"needs 1.0 GiB ({needed} bytes)" in message
    assert "2x its size for the job's artifacts" in message
    assert "COMPRESSOR_DATA_DIR" in message and "DELETE /v1/jobs/{id}" in message
    assert jobs_on_disk(data_dir) == []


def job_disk(upload_bytes: int, config: dict | None = None) -> int:
    """Return the disk the core says a job of `config` keeps for `upload_bytes` of weights."""
    return sum(job_disk_bytes(upload_bytes, CompressionConfig.model_validate(config or {}))
               .values())


def test_an_upload_with_room_for_itself_and_all_its_job_keeps_is_stored(
    client, data_dir, monkeypatch
) -> None:
    body = zip_bytes(512 << 10)
    declared = len(body) + 200  # the multipart framing around the file
    # the disk's free space is mocked: it does not shrink as the upload is written
    disk_with_free(monkeypatch, max(3 * declared, job_disk(len(body))) + GIB)
    response = client.post("/v1/jobs", files={"model": ("m.pt2", body)})
    assert response.status_code == 202, response.text
    assert [p.name for p in jobs_on_disk(data_dir)] == ["model.pt2"]


def test_an_upload_whose_job_would_not_fit_is_507_at_upload_with_its_parts_and_a_knob(
    client, data_dir, monkeypatch
) -> None:
    body = zip_bytes(512 << 10)
    needed = job_disk(len(body)) + GIB  # the defaults: target mode, fine-tuning checkpoints
    disk_with_free(monkeypatch, needed - 1)  # room for the upload and its artifacts, not more
    response = client.post("/v1/jobs", files={"model": ("m.pt2", body)})
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "insufficient_resources"
    assert f"needs {format_bytes(needed)} ({needed} bytes) more" in error["message"]
    assert "fine-tuning checkpoints" in error["message"]
    assert "finetune.checkpoint_every 0" in error["message"]
    assert jobs_on_disk(data_dir) == []  # what was received is gone
    # the knob it names makes the same upload fit
    lighter = {"ratio": 0.5, "finetune": {"checkpoint_every": 0}}
    assert job_disk(len(body), lighter) + GIB < needed - 1
    response = client.post("/v1/jobs", files={"model": ("m.pt2", body)},
                           data={"config": json.dumps(lighter)})
    assert response.status_code == 202, response.text


def test_a_config_sent_before_the_model_is_judged_before_a_byte_of_the_model_is_stored(
    client, data_dir, monkeypatch
) -> None:
    disk_with_free(monkeypatch, 3 * (600 << 10) + GIB)  # the first check passes
    writes = []
    monkeypatch.setattr(UploadSink, "write", lambda sink, chunk: writes.append(len(chunk)))
    model = zip_bytes(512 << 10)
    body = (b"--x\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n{}\r\n"
            b"--x\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt2\""
            b"\r\n\r\n" + model + b"\r\n--x--\r\n")
    response = client.post("/v1/jobs", content=body,
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 507
    assert "what it keeps for a retry" in response.json()["error"]["message"]
    assert writes == []
    assert jobs_on_disk(data_dir) == []


def test_an_upload_of_unknown_size_needs_the_reserve_free(client, data_dir, monkeypatch) -> None:
    disk_with_free(monkeypatch, GIB // 2)

    def body() -> Iterator[bytes]:
        yield b"--x\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt2\"\r\n\r\n"
        yield zip_bytes(1000) + b"\r\n--x--\r\n"

    response = client.post(
        "/v1/jobs", content=body(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 507
    assert "an upload of unknown size needs 1.0 GiB" in response.json()["error"]["message"]
    assert jobs_on_disk(data_dir) == []


def test_a_disk_that_fills_up_mid_upload_is_507_and_leaves_nothing(
    make_client, data_dir, monkeypatch
) -> None:
    client = make_client(embedded_worker=False, max_upload_bytes=64 * MIB)
    write = UploadSink.write

    def write_until_full(sink: UploadSink, chunk: bytes) -> None:
        if sink.size >= 2 * MIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(sink, chunk)

    monkeypatch.setattr(UploadSink, "write", write_until_full)
    response = client.post("/v1/jobs", files={"model": ("m.pt2", zip_bytes(8 * MIB))})
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "insufficient_resources"
    assert "filled up after" in error["message"] and "nothing was kept" in error["message"]
    assert jobs_on_disk(data_dir) == []
    assert not list((data_dir / "jobs").rglob(".*.part"))


def test_a_job_refused_for_lack_of_disk_says_so_in_its_error(make_client, fake_pt2) -> None:
    refusal = ResourceError("the job's artifacts need about 8.0 GiB of disk and the data "
                            "directory has 1.0 GiB free; free some space and retry")
    client = make_client(FakeJob(0.0, refusal))
    job_id = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}).json()["id"]
    job = wait_for_job(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == {"code": "insufficient_resources", "message": refusal.message}
