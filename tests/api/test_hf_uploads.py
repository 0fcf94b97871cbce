"""Hugging Face checkpoints through the API: archives and text data in, model-hf.zip out."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import pytest

import compressor
from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job
from tests.support.tiny_checkpoints import save_checkpoint, write_text, zip_folder


def tar_gz_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


def plain_tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


@pytest.mark.parametrize(("model", "data", "suffix"), [
    (tar_gz_bytes(), ("lines.txt", b"one sample\nanother sample\n"), ".txt"),
    (plain_tar_bytes(), ("lines.jsonl", b'{"text": "a"}\n{"text": "b"}\n'), ".jsonl"),
])
def test_checkpoint_archives_and_text_data_reach_the_job(make_client, model, data,
                                                         suffix) -> None:
    fake = FakeJob(0.0)
    client = make_client(fake)
    response = client.post("/v1/jobs", files={"model": ("model.tar.gz", model), "data": data})
    assert response.status_code == 202, response.text
    wait_for_job(client, response.json()["id"])
    # as the client named them, so that the job's messages do too; the data keeps its suffix
    assert fake.calls[0]["model"].name == "model.tar.gz"
    assert fake.calls[0]["data"].name == data[0] and data[0].endswith(suffix)


def test_a_text_file_that_is_not_text_is_415(make_client, data_dir) -> None:
    client = make_client(embedded_worker=False)
    response = client.post("/v1/jobs", files={"model": ("m.tar.gz", tar_gz_bytes()),
                                              "data": ("lines.txt", b"\x00\x01binary")})
    assert response.status_code == 415
    assert "UTF-8 text" in response.json()["error"]["message"]
    assert not [p for p in (data_dir / "jobs").rglob("*") if p.is_file()]


@pytest.mark.slow
def test_a_zipped_checkpoint_with_text_gives_a_downloadable_hugging_face_folder(
    make_client, tmp_path
) -> None:
    client = make_client(compressor.compress)
    archive = zip_folder(save_checkpoint("classifier", tmp_path / "model"), tmp_path / "m.zip")
    text = write_text(tmp_path / "lines.txt")
    config = {"ratio": 0.5, "finetune": {"steps": 4}, "export": {"latency_seconds": 0},
              "data": {"max_length": 16}}
    response = client.post(
        "/v1/jobs", data={"config": json.dumps(config)},
        files={"model": ("m.zip", archive.read_bytes()), "data": ("lines.txt", text.read_bytes())})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert [a["name"] for a in job["artifacts"]] == ["model.onnx", "report.json", "job.log",
                                                      "model-hf.zip"]
    assert job["report"]["data"]["source"] == "lines.txt"  # the name it was sent as
    download = client.get(f"/v1/jobs/{job['id']}/artifacts/model-hf.zip")
    assert download.status_code == 200
    assert download.headers["etag"] == f'"{hashlib.sha256(download.content).hexdigest()}"'
    with zipfile.ZipFile(io.BytesIO(download.content)) as folder:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(folder.namelist())
