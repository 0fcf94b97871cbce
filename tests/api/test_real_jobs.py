"""Jobs run by the real `compressor.compress` behind the API: bad models, timeout, cancel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import compressor
from tests.support.service import wait_for_job
from tests.support.tiny_models import TinyMLP

pytestmark = pytest.mark.slow


@pytest.fixture
def client(make_client):
    """An app that runs the real core in a thread of its own (serve uses worker processes)."""
    return make_client(compressor.compress)


def submit(client, model: Path, config: str = "{}") -> str:
    """Submit `model` with `config`; return the job id."""
    response = client.post(
        "/v1/jobs", files={"model": ("model.pt2", model.read_bytes())}, data={"config": config}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.parametrize(
    ("saved", "code", "phrase"),
    [
        ("state_dict", "invalid_model", "bare state_dict"),
        ("module", "unsafe_model", "unpickling it would run code"),
    ],
)
def test_a_torch_save_file_fails_the_job_with_the_cores_message(
    client, tmp_path, saved, code, phrase
) -> None:
    model = TinyMLP()
    path = tmp_path / "model.pt2"
    torch.save(model.state_dict() if saved == "state_dict" else model, path)
    job = wait_for_job(client, submit(client, path))
    assert job["status"] == "failed"
    assert job["error"]["code"] == code
    assert phrase in job["error"]["message"]
    assert "torch.export.save" in job["error"]["message"]
    assert job["artifacts"] == [] or {a["name"] for a in job["artifacts"]} <= {"job.log"}


def test_a_job_past_its_timeout_fails_with_code_timeout(client, mlp_pt2) -> None:
    job_id = submit(client, mlp_pt2, '{"ratio": 0.5, "timeout_s": 0.5, "max_minutes": null, '
                   '"finetune": {"steps": 1000000}}')
    job = wait_for_job(client, job_id, timeout=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "timeout"
    assert "timeout_s" in job["error"]["message"]


def test_cancel_stops_a_real_job_while_it_fine_tunes(client, mlp_pt2) -> None:
    job_id = submit(client, mlp_pt2, '{"ratio": 0.5, "finetune": {"steps": 1000000}}')
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["stage"] != "finetuning":
        assert time.monotonic() < deadline, "the job never reached fine-tuning"
        time.sleep(0.1)
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_for_job(client, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 5
