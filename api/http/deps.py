"""Route dependencies, as `Annotated` aliases: what a handler needs reads in its signature."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from api.http.errors import ApiError
from api.jobs.database import JobDatabase, JobRecord
from api.jobs.service import find_job
from api.services import Services
from api.settings import ANONYMOUS_TENANT, Settings
from compressor.vocabulary import ErrorCode

# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in a
# worker thread, a hop that costs more than these functions themselves.


async def get_services(request: Request) -> Services:
    """Return the process's services, opened at application start."""
    return request.app.state.services


async def get_settings_dep(request: Request) -> Settings:
    """Return the settings the application was created with."""
    return request.app.state.settings


async def get_store(services: Annotated[Services, Depends(get_services)]) -> JobDatabase:
    """Return the job store."""
    return services.store


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[JobDatabase, Depends(get_store)]

_BEARER = "bearer "


async def get_tenant(request: Request, settings: SettingsDep) -> str:
    """Return the caller's tenant id, from `Authorization: Bearer <key>`; 401 otherwise.

    With no keys configured every caller is the one anonymous tenant (the server then listens on
    loopback only). A key is compared by its sha256, and the tenant id is a hash of it.
    """
    if not settings.api_keys:
        return ANONYMOUS_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
    header = request.headers.get("authorization", "")
    if not header:
        raise ApiError(
            401, ErrorCode.UNAUTHORIZED,
            "missing API key: send it as `Authorization: Bearer <key>` (the CLI reads "
            "--api-key or COMPRESSOR_API_KEY)",
            headers=challenge,
        )
    if not header.lower().startswith(_BEARER) or not header[len(_BEARER):].strip():
        raise ApiError(
            401, ErrorCode.UNAUTHORIZED,
            "malformed Authorization header: expected `Authorization: Bearer <key>`",
            headers=challenge,
        )
    digest = hashlib.sha256(header[len(_BEARER):].strip().encode()).hexdigest()
    tenant = settings.tenants_by_key_hash.get(digest)
    if tenant is None:
        raise ApiError(
            401, ErrorCode.UNAUTHORIZED,
            "the API key is not valid for this server; check it against COMPRESSOR_API_KEYS "
            "on the server",
            headers=challenge,
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def get_owned_job(
    job_id: Annotated[str, Path(description="the job's id", max_length=64)],
    store: StoreDep,
    tenant: TenantDep,
) -> JobRecord:
    """Return the caller's job `job_id`; 404 when it does not exist or is another tenant's."""
    return await run_in_threadpool(find_job, store, job_id, tenant)


JobDep = Annotated[JobRecord, Depends(get_owned_job)]
