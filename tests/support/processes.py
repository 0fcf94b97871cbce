"""Run `compressor serve` and `compressor worker` as real subprocesses on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST_ENV = {
    "COMPRESSOR_HEARTBEAT_S": "0.5",
    # Twelve heartbeats: a loaded CI machine (the worker runs niced) must not lose a lease.
    "COMPRESSOR_LEASE_S": "6",
    "COMPRESSOR_REAP_INTERVAL_S": "0.5",
    "COMPRESSOR_CANCEL_POLL_S": "0.1",
    "COMPRESSOR_EVENTS_POLL_S": "0.1",
    "COMPRESSOR_PROGRESS_INTERVAL_S": "0.1",
    "COMPRESSOR_QUEUE_POLL_S": "0.1",
}


def _command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("compressor")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from compressor.cli import main; main()", *args]


class ServiceProcess:
    """One `compressor serve|worker ...` subprocess; its output goes to `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSOR_")}
        full_env.update({"PYTHONPATH": str(REPO_ROOT), **FAST_ENV, **env})
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop/kill)
        self.process = subprocess.Popen(
            _command(*args), cwd=REPO_ROOT, env=full_env, stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """Return what the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """Send SIGTERM and wait for the exit; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the process (no clean-up of any kind runs)."""
        self.process.kill()
        self.process.wait(10)
        self._log.close()


class ServerProcess(ServiceProcess):
    """`compressor serve` on a free port, with an httpx client for it."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str, api_key: str = "") -> None:
        self.port = free_port()
        super().__init__(["serve", "--port", str(self.port), *extra], env, log_path)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=30
        )

    def wait_ready(self, timeout: float = 90, path: str = "/readyz") -> None:
        """Wait until `path` answers 200 (/readyz: a worker is alive too; /healthz: the API
        answers); fail with the log if the process dies or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                if self.client.get(path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        """Close the client, SIGTERM the server and return its exit code."""
        self.client.close()
        return super().stop(timeout)

    def kill(self) -> None:
        """Close the client and SIGKILL the server."""
        self.client.close()
        super().kill()
