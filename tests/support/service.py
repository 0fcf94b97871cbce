"""Helpers shared by the service tests: fast settings, an app served on loopback, waiting."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from api.settings import Settings

FAST = {
    "heartbeat_s": 0.2,
    "lease_s": 1.5,
    "reap_interval_s": 0.2,
    "cancel_poll_s": 0.05,
    "events_poll_s": 0.05,
    "progress_interval_s": 0.05,
    "queue_poll_s": 0.05,
    "shutdown_timeout_s": 10,
}
FINISHED = ("succeeded", "failed", "cancelled")


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Return settings under `data_dir` with short leases and polls, for quick tests."""
    return Settings(data_dir=data_dir, **{**FAST, **overrides})


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    statuses: tuple[str, ...] = FINISHED,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until its status is one of `statuses`; return the job."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.05)


@contextmanager
def serve_in_thread(app: Any) -> Iterator[httpx.Client]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yield a client for it."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start; see the log above")
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
