"""`GET /`: the web console (a static page and its scripts, shipped in `api/console/`).

The page talks to the service through the public REST API only, with the API key kept in the
tab's sessionStorage. `GET /v1/config` gives it the job config's defaults and JSON schema, and the pipeline's stages;
`POST /v1/config/validate` checks a config before its files are uploaded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from api.http.deps import TenantDep
from api.http.errors import ApiError
from api.http.schemas import error_responses
from api.http.uploads import MAX_CONFIG_BYTES, validate_config
from compressor.config import CompressionConfig
from compressor.vocabulary import JOB_STAGES, ErrorCode

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "console"
# Everything the page loads comes from this server: no CDN, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The tab's icon: a small square of the console's accent color with a narrower bar in it.
_FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#3056d3"/>'
    '<rect x="3" y="4" width="10" height="3" rx="1" fill="#fff"/>'
    '<rect x="3" y="9" width="5" height="3" rx="1" fill="#fff"/></svg>'
)

router = APIRouter(tags=["console"])


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def read_console() -> FileResponse:
    """Return the console's page."""
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html",
                        headers=SECURITY_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def read_favicon() -> Response:
    """Return the tab's icon (SVG, which browsers accept at this address too)."""
    return Response(_FAVICON, media_type="image/svg+xml",
                    headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"})


@lru_cache(maxsize=1)
def _config_description() -> dict[str, Any]:
    return {
        "defaults": CompressionConfig().to_dict(),
        "schema": CompressionConfig.model_json_schema(),
        "stages": list(JOB_STAGES),
    }


@router.get("/v1/config", tags=["jobs"], summary="The job config's defaults and schema")
async def read_config_defaults() -> dict[str, Any]:
    """Return `defaults` (the config `{}` stands for), `schema` (its JSON schema) and `stages`
    (the pipeline's stages, in the order they run)."""
    return _config_description()


@router.post(
    "/v1/config/validate", tags=["jobs"], responses=error_responses(401, 413, 422),
    summary="Check a job config without submitting a job",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object"}, "example": {"method": "lowrank", "ratio": 0.5}}}}},
)
async def validate_job_config(request: Request, _tenant: TenantDep) -> dict[str, Any]:
    """Return the config (JSON body) with every default filled, or 422 naming each bad field,
    exactly as `POST /v1/jobs` would judge its `config` field: checked before an upload."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CONFIG_BYTES:
            raise ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE,
                           f"the config is over {MAX_CONFIG_BYTES} bytes; a job config is a few lines")
    return validate_config(bytes(body))
