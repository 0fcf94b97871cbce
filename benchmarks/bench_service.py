"""Measure the service as users meet it and print a markdown table.

Each figure comes from a real `compressor serve` process on a free loopback port:

- submit -> running: time from the start of `POST /v1/jobs` to the job's `started_at`, with an
  idle embedded worker (target < 1 s);
- `GET /v1/jobs/{id}` latency with 100 concurrent keep-alive clients, each polling once per
  second (a realistic load), and saturated (each sends its next request at once) (target p99 <
  50 ms on 2 cores);
- the same two loads while the embedded worker fine-tunes a job on the same cores, with the
  worker's defaults (nice 10, torch threads = cores - 1) and with the old behaviour (nice 0,
  every core) for comparison (target p99 < 100 ms);
- server RSS growth while it receives a 1 GiB upload, generated as a stream (target < 100 MiB);
- jobs per minute for the tiny MLP (`finetune.steps` 5) with 1 and 2 embedded workers, after a
  warm-up job (the first job of a process also pays for torch's lazy initialization).

    .venv/bin/python benchmarks/bench_service.py [--only submit,poll,training,upload,throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for the tests' helpers: tests.support
MIB = 1 << 20
QUICK_CONFIG = json.dumps({"finetune": {"steps": 5}, "export": {"latency_seconds": 0}})

from tests.support.network import free_port  # noqa: E402


class Server:
    """A `compressor serve` subprocess with its own data directory."""

    def __init__(self, workers: int, data_dir: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSOR_")}
        env.update({"PYTHONPATH": str(REPO_ROOT), "COMPRESSOR_DATA_DIR": str(data_dir)})
        env.update({f"COMPRESSOR_{name.upper()}": value for name, value in settings.items()})
        script = Path(sys.executable).with_name("compressor")
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [str(script), "serve", "--port", str(self.port), "--workers", str(workers),
             "--log-level", "warning"],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=600)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server not ready after 120 s")

    def rss_bytes(self) -> int:
        """Return the server process's resident set size."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s)."""
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def submit(client: httpx.Client, model: Path, config: str = QUICK_CONFIG) -> str:
    """Submit a job; return its id."""
    response = client.post(
        "/v1/jobs", files={"model": ("model.pt2", model.read_bytes())}, data={"config": config}
    )
    response.raise_for_status()
    return response.json()["id"]


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    """Poll until the job finished; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def percentile(values: list[float], q: float) -> float:
    """Return the q-quantile (0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- submit -> running ------------------------------------------------------------------------


def bench_submit_to_running(work: Path, models: dict[str, Path], runs: int = 10) -> list[str]:
    """Time POST to started_at with an idle worker, over `runs` jobs that fail fast."""
    server = Server(1, work / "submit-data")
    try:
        wait_finished(server.client, submit(server.client, models["state_dict"], "{}"))  # worker up
        waits = []
        for _ in range(runs):
            time.sleep(1.0)  # the worker is idle, waiting on the queue
            posted = time.time()
            job_id = submit(server.client, models["state_dict"], "{}")
            job = wait_finished(server.client, job_id)
            started = datetime.fromisoformat(job["started_at"]).timestamp()
            waits.append(started - posted)
    finally:
        server.stop()
    return [
        f"| submit → running, idle embedded worker | p50 {statistics.median(waits) * 1000:.0f} ms, "
        f"max {max(waits) * 1000:.0f} ms ({runs} jobs) | < 1 s |"
    ]


# -- GET /v1/jobs/{id} under 100 clients ------------------------------------------------------


async def _poller(
    port: int, path: str, latencies: list[float], stop_at: float, interval: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    next_at = time.monotonic() + interval * random.random()  # spread the clients over 1 s
    while time.monotonic() < stop_at:
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - started)
    writer.close()


async def _load(port: int, path: str, clients: int, seconds: float, interval: float) -> list[float]:
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    await asyncio.gather(
        *(_poller(port, path, latencies, stop_at, interval) for _ in range(clients))
    )
    return latencies


def _load_in_subprocess(port: int, path: str, interval: float, seconds: float) -> list[float]:
    """Run the 100 clients in a separate process, so the server has its own core."""
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); import bench_service as b; "
        "print(json.dumps(asyncio.run(b._load(int(sys.argv[2]), sys.argv[3], 100, "
        "float(sys.argv[5]), float(sys.argv[4])))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(port), path, str(interval),
         str(seconds)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def bench_poll_latency(work: Path, models: dict[str, Path]) -> list[str]:
    """Measure GET /v1/jobs/{id} latency with 100 concurrent clients."""
    server = Server(0, work / "poll-data")
    try:
        job_id = submit(server.client, models["mlp"])
        path = f"/v1/jobs/{job_id}"
        _load_in_subprocess(server.port, path, 0.0, 2)  # warm-up
        rows = []
        for label, interval, seconds in (("each polling 1/s", 1.0, 20),
                                         ("saturated, no pause", 0.0, 10)):
            latencies = _load_in_subprocess(server.port, path, interval, seconds)
            rate = len(latencies) / seconds
            rows.append(
                f"| `GET /v1/jobs/{{id}}`, 100 concurrent clients {label} | p50 "
                f"{percentile(latencies, 0.5) * 1000:.1f} ms, p99 "
                f"{percentile(latencies, 0.99) * 1000:.1f} ms ({rate:.0f} req/s) | p99 < 50 ms |"
            )
    finally:
        server.stop()
    return rows


# -- GET /v1/jobs/{id} while a job fine-tunes on the same cores ---------------------------------

TRAINING_CONFIG = json.dumps({"finetune": {"steps": 1_000_000, "batch_size": 256}})


def bench_poll_while_training(work: Path, models: dict[str, Path]) -> list[str]:
    """Measure GET /v1/jobs/{id} under 100 clients while the embedded worker fine-tunes."""
    cores = os.cpu_count() or 1
    rows = []
    for label, settings in (
        (f"worker at nice 0, {cores} torch threads (before)",
         {"worker_nice": "0", "worker_threads": str(cores)}),
        ("worker defaults: nice 10, torch threads = cores − 1", {}),
    ):
        server = Server(1, work / f"training-{len(rows)}-data", **settings)
        try:
            job_id = submit(server.client, models["mlp"], TRAINING_CONFIG)
            deadline = time.monotonic() + 120
            while server.client.get(f"/v1/jobs/{job_id}").json()["stage"] != "finetuning":
                if time.monotonic() > deadline:
                    raise RuntimeError("the job never reached fine-tuning")
                time.sleep(0.2)
            path = f"/v1/jobs/{job_id}"
            for load, interval, seconds in (("each polling 1/s", 1.0, 20),
                                            ("saturated, no pause", 0.0, 10)):
                latencies = _load_in_subprocess(server.port, path, interval, seconds)
                rows.append(
                    f"| `GET /v1/jobs/{{id}}` while a job fine-tunes, {label}, 100 clients {load}"
                    f" | p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 "
                    f"{percentile(latencies, 0.99) * 1000:.1f} ms "
                    f"({len(latencies) / seconds:.0f} req/s) | p99 < 100 ms |"
                )
            server.client.post(f"/v1/jobs/{job_id}/cancel")
        finally:
            server.stop()
    return rows


# -- RSS during a 1 GiB upload ----------------------------------------------------------------


def _multipart_stream(size: int, chunk: int = MIB) -> Iterator[bytes]:
    yield (b'--bench\r\nContent-Disposition: form-data; name="model"; filename="big.pt2"\r\n'
           b"Content-Type: application/octet-stream\r\n\r\nPK\x03\x04")
    zeros = b"\0" * chunk
    sent = 4
    while sent < size:
        piece = zeros[: min(chunk, size - sent)]
        sent += len(piece)
        yield piece
    yield b"\r\n--bench--\r\n"


def bench_upload_rss(work: Path, size: int = 1 << 30) -> list[str]:
    """Measure the server's RSS growth while it receives a `size`-byte upload."""
    server = Server(0, work / "upload-data")
    try:
        server.client.get("/v1/jobs")  # touch the code paths once
        baseline = server.rss_bytes()
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.rss_bytes())
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        response = server.client.post(
            "/v1/jobs", content=_multipart_stream(size),
            headers={"Content-Type": "multipart/form-data; boundary=bench"},
        )
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        response.raise_for_status()
        server.client.delete(f"/v1/jobs/{response.json()['id']}")
    finally:
        server.stop()
    return [
        f"| server RSS growth receiving a {size / 2**30:.0f} GiB upload | "
        f"{(peak - baseline) / MIB:.1f} MiB (baseline {baseline / MIB:.0f} MiB; "
        f"{size / MIB / elapsed:.0f} MiB/s) | < 100 MiB |"
    ]


# -- jobs per minute ---------------------------------------------------------------------------


def bench_throughput(work: Path, models: dict[str, Path], jobs: int) -> list[str]:
    """Measure finished jobs per minute with 1 and 2 embedded workers."""
    rows = []
    for workers in (1, 2):
        server = Server(workers, work / f"throughput-{workers}-data")
        try:
            warm = [submit(server.client, models["mlp"]) for _ in range(workers)]
            for job_id in warm:
                assert wait_finished(server.client, job_id)["status"] == "succeeded"
            started = time.monotonic()
            ids = [submit(server.client, models["mlp"]) for _ in range(jobs)]
            finished = [wait_finished(server.client, job_id) for job_id in ids]
            elapsed = time.monotonic() - started
        finally:
            server.stop()
        failed = [job["error"] for job in finished if job["status"] != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {jobs} jobs did not succeed: {failed}")
        rows.append(
            f"| tiny MLP jobs per minute, {workers} embedded worker(s), steps 5 | "
            f"{jobs / elapsed * 60:.1f} ({jobs} jobs in {elapsed:.1f} s) | — |"
        )
    return rows


def make_models(folder: Path) -> dict[str, Path]:
    """Export the tiny MLP and save a state_dict (a job that fails at once, in the worker)."""
    import torch

    from tests.support.tiny_models import TinyMLP, make_pt2

    state_dict = folder / "state_dict.pt2"
    torch.save(TinyMLP().state_dict(), state_dict)
    return {"mlp": make_pt2("mlp", folder / "mlp.pt2"), "state_dict": state_dict}


def main() -> None:
    """Run the chosen measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="submit,poll,training,upload,throughput")
    parser.add_argument("--jobs", type=int, default=6, help="jobs per throughput run")
    parser.add_argument("--upload-gib", type=float, default=1.0)
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    rows = []
    try:
        models = make_models(work)
        if "submit" in chosen:
            rows += bench_submit_to_running(work, models)
        if "poll" in chosen:
            rows += bench_poll_latency(work, models)
        if "training" in chosen:
            rows += bench_poll_while_training(work, models)
        if "upload" in chosen:
            rows += bench_upload_rss(work, int(args.upload_gib * (1 << 30)))
        if "throughput" in chosen:
            rows += bench_throughput(work, models, args.jobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Service benchmark ({os.cpu_count()} CPU cores, loopback, SQLite defaults)\n")
    print("| measure | result | target |")
    print("|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
