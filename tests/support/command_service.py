"""Start a `compressor serve` process for a test, wait until it answers, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

VENV_BIN = Path(sys.executable).parent  # holds the `compressor` console script


def serve_available() -> bool:
    """Return whether `compressor serve --help` works (the service is installed)."""
    result = subprocess.run(
        [str(VENV_BIN / "compressor"), "serve", "--help"], capture_output=True, timeout=120
    )
    return result.returncode == 0


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Return an environment for the service: this venv first on PATH, no stray COMPRESSOR_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSOR_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COMPRESSOR_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


class CommandProcess:
    """A running service: its `process`, `base_url` and the file holding its output."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log

    def output(self) -> str:
        """Return what the process printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """Send SIGTERM (what `docker stop` sends) and return the exit status.

        Raises AssertionError if the process outlives `timeout` (docker would SIGKILL it).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the service ignored SIGTERM for {timeout:g} s:\n{self.output()[-3000:]}"
            ) from None


def wait_until_healthy(
    service: CommandProcess, timeout: float = 120.0, path: str = "/healthz"
) -> None:
    """Poll `path` until it answers 200 (/healthz: the API answers; /readyz: its job worker is
    up too); fail with the service's output if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(
                f"the service exited with {service.process.returncode} before answering:\n"
                f"{service.output()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{service.base_url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{path} did not answer 200 within {timeout:g} s:\n{service.output()}")


@contextmanager
def running_service(
    command: Sequence[str], env: dict[str, str], port: int, cwd: Path
) -> Iterator[CommandProcess]:
    """Run `command` (a `compressor serve ...` line) until healthy; stop it on exit."""
    log = cwd / f"service-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT
        )
    service = CommandProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_healthy(service)
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
