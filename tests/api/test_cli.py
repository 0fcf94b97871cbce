"""`compressor serve` and `compressor worker`: refusals with a reason, and a cheap CLI import."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from compressor.cli import main
from tests.support.processes import REPO_ROOT


def test_serve_refuses_a_public_host_without_keys_and_says_how_to_set_them() -> None:
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to serve on '0.0.0.0' without API keys" in result.output
    assert "COMPRESSOR_API_KEYS" in result.output


def test_serve_reports_bad_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("COMPRESSOR_MAX_UPLOAD_BYTES", "lots")
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2
    assert "max_upload_bytes" in result.output


def test_worker_reports_bad_settings(monkeypatch) -> None:
    monkeypatch.setenv("COMPRESSOR_LEASE_S", "1")
    monkeypatch.setenv("COMPRESSOR_HEARTBEAT_S", "5")
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 2
    assert "must be shorter than lease_s" in result.output


def test_importing_the_cli_does_not_import_the_service() -> None:
    code = (
        "import sys, compressor.cli; "
        "print(sorted(m for m in ('api', 'fastapi', 'uvicorn', 'sqlalchemy', 'huey') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
