"""Service settings, read from `COMPRESSOR_*` environment variables (pydantic-settings).

`get_settings()` builds them once per process. Defaults run everything on one machine: a SQLite
job store and queue under `data_dir`, no API keys and therefore loopback only.
"""

from __future__ import annotations

import hashlib
import ipaddress
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

GIB = 1024**3

NO_KEYS_ON_PUBLIC_HOST = (
    "refusing to serve on {host!r} without API keys: anyone who can reach this machine could "
    "submit and read jobs. Set COMPRESSOR_API_KEYS to one or more comma-separated keys (one per "
    "tenant, e.g. `export COMPRESSOR_API_KEYS=$(python -c 'import secrets; "
    "print(secrets.token_urlsafe(32))')`) and send them as `Authorization: Bearer <key>`, or "
    "serve on 127.0.0.1 only"
)


def is_loopback(host: str) -> bool:
    """Return True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tenant_id_for_key(key: str) -> str:
    """Return the tenant id stored as a job's owner for `key`: a hash, never the key itself."""
    return "t_" + hashlib.sha256(key.encode()).hexdigest()[:32]


ANONYMOUS_TENANT = "anonymous"


class Settings(BaseSettings):
    """Everything the API, the queue and the workers are configured by."""

    model_config = SettingsConfigDict(env_prefix="COMPRESSOR_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./compressor-data"),
        description="uploads, artifacts and the SQLite files; shared by every worker",
    )
    store_url: str | None = Field(
        default=None,
        description="job store (SQLAlchemy URL); default sqlite:///<data_dir>/jobs.db, "
        "e.g. postgresql+psycopg://user:pass@host/db",
    )
    queue_url: str | None = Field(
        default=None,
        description="queue; default sqlite:///<data_dir>/queue.db, or redis://host:6379/0",
    )
    queue_name: str = Field(
        default="compressor", pattern=r"^[A-Za-z0-9_]+$", description="queue (Redis key) name"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated; each key is its own tenant"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_upload_bytes: int = Field(
        default=64 * GIB, ge=1,
        description="largest upload (model and data file together) before 413; uploads stream "
        "to disk, so memory does not grow with it",
    )
    disk_reserve_bytes: int = Field(
        default=1 * GIB, ge=0,
        description="free space an upload must leave on the data directory's disk besides "
        "itself and what its job will keep (its artifacts, 2x the upload, and the products kept "
        "for a retry): 507 otherwise",
    )
    max_jobs_in_flight: int = Field(
        default=8, ge=1, description="queued + running jobs per tenant before 429"
    )
    embedded_worker: bool = Field(
        default=True, description="`serve` also runs job worker processes"
    )
    worker_concurrency: int = Field(
        default=1, ge=0, le=64, description="job worker processes (one job each) per machine"
    )
    heartbeat_s: float = Field(default=5.0, gt=0, description="how often a worker renews a lease")
    lease_s: float = Field(
        default=30.0, gt=0, description="a running job whose lease is this old is re-queued"
    )
    max_attempts: int = Field(default=3, ge=1, description="runs of a job whose workers died")
    reap_interval_s: float = Field(
        default=5.0, gt=0, description="how often leases and lost queue messages are checked"
    )
    requeue_after_s: float = Field(
        default=60.0, gt=0,
        description="a job queued this long with no message in the queue (its worker died "
        "between taking and starting it) is re-enqueued",
    )
    ready_requires_worker: bool = Field(
        default=True,
        description="`/readyz` answers 503 while no job worker sent a heartbeat within "
        "`lease_s`; turn off for API replicas that should serve reads without workers",
    )
    worker_nice: int = Field(
        default=10, ge=0, le=19,
        description="embedded job workers lower their CPU priority by this much (`os.nice`), "
        "so the API stays responsive while jobs train",
    )
    worker_threads: int = Field(
        default=0, ge=0, le=256,
        description="torch threads per embedded job worker; 0: the cores less one for the API, "
        "shared among the workers",
    )
    progress_interval_s: float = Field(default=0.5, ge=0, description="store progress this often")
    cancel_poll_s: float = Field(default=0.5, gt=0, description="check the cancel flag this often")
    events_poll_s: float = Field(default=0.5, gt=0, description="SSE: read the job this often")
    queue_poll_s: float = Field(default=0.25, gt=0, description="SQLite queue: idle poll interval")
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="wait this long for running jobs to stop at shutdown"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(NO_KEYS_ON_PUBLIC_HOST.format(host=self.host))
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be shorter than lease_s "
                f"({self.lease_s:g}), or every running job would look dead"
            )
        return self

    @property
    def resolved_store_url(self) -> str:
        """Return the job store URL, the SQLite file under `data_dir` by default."""
        return self.store_url or f"sqlite:///{self.data_dir.resolve() / 'jobs.db'}"

    @property
    def resolved_queue_url(self) -> str:
        """Return the queue URL, the SQLite file under `data_dir` by default."""
        return self.queue_url or f"sqlite:///{self.data_dir.resolve() / 'queue.db'}"

    @cached_property
    def tenants_by_key_hash(self) -> dict[str, str]:
        """Map sha256(key) to tenant id, so a request's key is compared by hash only."""
        return {
            hashlib.sha256(key.get_secret_value().encode()).hexdigest(): tenant_id_for_key(
                key.get_secret_value()
            )
            for key in self.api_keys
        }

    def public_summary(self) -> dict[str, str]:
        """Return the settings worth printing at start, with passwords and keys left out."""
        keys = (
            f"{len(self.api_keys)} configured"
            if self.api_keys
            else "none: one anonymous tenant, loopback only"
        )
        return {
            "data_dir": str(self.data_dir.resolve()),
            "store": _hide_password(self.resolved_store_url),
            "queue": _hide_password(self.resolved_queue_url) + f" (name {self.queue_name})",
            "api_keys": keys,
            "max_upload": f"{self.max_upload_bytes / GIB:.2f} GiB (disk reserve "
            f"{self.disk_reserve_bytes / GIB:.2f} GiB)",
            "max_jobs_in_flight": f"{self.max_jobs_in_flight} per tenant",
            "embedded_worker": (
                f"{self.worker_concurrency} worker process(es), one job each"
                if self.embedded_worker and self.worker_concurrency
                else "off"
            ),
            "lease": f"{self.lease_s:g} s (heartbeat {self.heartbeat_s:g} s, "
            f"{self.max_attempts} attempt(s))",
        }


def _hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not an URL SQLAlchemy can parse: keep only what follows any '@'
        return url.split("@")[-1]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process's settings, read from the environment on first use."""
    return Settings()
