"""API keys: 401 without a valid key, and one tenant never sees another's job on any route."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from tests.support.fakes import FakeJob
from tests.support.service import wait_for_job

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"


def bearer(key: str) -> dict[str, str]:
    """Return the Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(make_client):
    """An app with two tenants whose jobs finish at once."""
    return make_client(FakeJob(0.0), api_keys=f"{ALICE}, {BOB}")


@pytest.fixture
def alice_job(client, fake_pt2) -> str:
    """Return the id of a finished job of Alice's."""
    response = client.post(
        "/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}, headers=bearer(ALICE)
    )
    assert response.status_code == 202
    job_id = response.json()["id"]
    wait_for_job(client, job_id, headers=bearer(ALICE))
    return job_id


@pytest.mark.parametrize(
    ("headers", "phrase"),
    [
        ({}, "missing API key"),
        (bearer("wrong-key"), "not valid"),
        ({"Authorization": f"Basic {ALICE}"}, "malformed Authorization header"),
        ({"Authorization": "Bearer"}, "malformed Authorization header"),
    ],
)
def test_requests_without_a_valid_key_are_401(client, headers, phrase) -> None:
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x")):
        response = client.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "unauthorized" and phrase in error["message"]


def test_health_routes_need_no_key(client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{id}"),
        ("POST", "/v1/jobs/{id}/cancel"),
        ("DELETE", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/artifacts/model.onnx"),
        ("GET", "/v1/jobs/{id}/artifacts/report.json"),
        ("GET", "/v1/jobs/{id}/events"),
    ],
)
def test_another_tenants_job_is_404_on_every_route(client, alice_job, method, path) -> None:
    url = path.format(id=alice_job)
    as_bob = client.request(method, url, headers=bearer(BOB))
    assert as_bob.status_code == 404
    assert as_bob.json()["error"]["message"] == (
        f"no job {alice_job!r}; list your jobs with GET /v1/jobs"
    )
    as_alice = client.request(method, url, headers=bearer(ALICE))
    assert as_alice.status_code in (200, 204, 409)  # 409: cancelling a finished job


def test_listings_hold_only_the_callers_jobs(client, alice_job, fake_pt2) -> None:
    bobs = client.post(
        "/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())}, headers=bearer(BOB)
    ).json()["id"]
    alice_ids = [j["id"] for j in client.get("/v1/jobs", headers=bearer(ALICE)).json()["data"]]
    bob_ids = [j["id"] for j in client.get("/v1/jobs", headers=bearer(BOB)).json()["data"]]
    assert (alice_ids, bob_ids) == ([alice_job], [bobs])


def test_the_owner_is_stored_as_a_hash_never_the_key(client, alice_job, data_dir) -> None:
    engine = sa.create_engine(f"sqlite:///{data_dir / 'jobs.db'}")
    with engine.connect() as conn:
        owner = conn.execute(sa.text("SELECT owner FROM jobs")).scalar_one()
    engine.dispose()
    assert ALICE not in owner
    assert owner == "t_" + hashlib.sha256(ALICE.encode()).hexdigest()[:32]


def test_without_keys_everyone_is_the_one_anonymous_tenant(make_client, fake_pt2) -> None:
    client = make_client(embedded_worker=False)
    response = client.post("/v1/jobs", files={"model": ("m.pt2", fake_pt2.read_bytes())})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer("anything")).status_code == 200


def test_an_upload_with_a_wrong_key_is_refused_without_receiving_it(client) -> None:
    sent, total = 0, 256 << 20

    def body():
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="model"; filename="m.pt2"\r\n\r\nPK'
        while sent < total:
            sent += 256 << 10
            yield b"\0" * (256 << 10)
        yield b"\r\n--x--\r\n"

    response = client.post(
        "/v1/jobs", content=body(),
        headers={**bearer("wrong-key"), "content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 401
    assert response.headers["connection"] == "close"
    assert sent < total / 4
