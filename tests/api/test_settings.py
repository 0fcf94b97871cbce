"""Settings from COMPRESSOR_* variables: defaults, key parsing, refusals, printing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from api.settings import Settings, get_settings, is_loopback, tenant_id_for_key


def test_defaults_run_everything_on_one_machine(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == Path("compressor-data")
    assert settings.resolved_store_url == f"sqlite:///{tmp_path / 'compressor-data' / 'jobs.db'}"
    assert settings.resolved_queue_url == f"sqlite:///{tmp_path / 'compressor-data' / 'queue.db'}"
    assert (settings.host, settings.api_keys, settings.embedded_worker) == ("127.0.0.1", [], True)
    assert settings.max_upload_bytes == 64 * 1024**3  # well past 2 GiB: billion-parameter models
    assert settings.disk_reserve_bytes == 1024**3


def test_environment_variables_configure_every_field(monkeypatch) -> None:
    monkeypatch.setenv("COMPRESSOR_API_KEYS", " alpha , beta,,")
    monkeypatch.setenv("COMPRESSOR_STORE_URL", "postgresql+psycopg://u:secret@db/jobs")
    monkeypatch.setenv("COMPRESSOR_QUEUE_URL", "redis://:hunter2@cache:6379/0")
    monkeypatch.setenv("COMPRESSOR_MAX_JOBS_IN_FLIGHT", "3")
    monkeypatch.setenv("COMPRESSOR_HOST", "0.0.0.0")
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["alpha", "beta"]
    assert settings.max_jobs_in_flight == 3
    assert set(settings.tenants_by_key_hash.values()) == {
        tenant_id_for_key("alpha"), tenant_id_for_key("beta")
    }


def test_the_printed_summary_holds_no_secret(monkeypatch) -> None:
    monkeypatch.setenv("COMPRESSOR_API_KEYS", "very-secret-key")
    monkeypatch.setenv("COMPRESSOR_STORE_URL", "postgresql+psycopg://u:db-password@db/jobs")
    monkeypatch.setenv("COMPRESSOR_QUEUE_URL", "redis://:redis-password@cache:6379/0")
    summary = " ".join(Settings().public_summary().values())
    for secret in ("very-secret-key", "db-password", "redis-password"):
        assert secret not in summary
    assert "1 configured" in summary and "db/jobs" in summary and "cache:6379" in summary
    assert "very-secret-key" not in repr(Settings())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_a_public_host_without_keys_is_refused_with_what_to_do(host: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(host=host)
    message = str(raised.value)
    assert "without API keys" in message and "COMPRESSOR_API_KEYS" in message
    assert Settings(host=host, api_keys="k1").host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_keys(host: str) -> None:
    assert is_loopback(host)
    assert Settings(host=host).host == host


def test_a_heartbeat_not_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat_s .* must be shorter than lease_s"):
        Settings(heartbeat_s=30, lease_s=30)


def test_get_settings_is_built_once(monkeypatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("COMPRESSOR_MAX_ATTEMPTS", "5")
    try:
        assert get_settings() is get_settings()
        assert get_settings().max_attempts == 5
    finally:
        get_settings.cache_clear()
