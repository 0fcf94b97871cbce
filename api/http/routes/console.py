"""`GET /`: the web console (a static page and its scripts, shipped in `api/console/`).

The page talks to the service through the public REST API only, with the API key kept in the
tab's sessionStorage. `GET /v1/config` gives it the job config's defaults and JSON schema, and the pipeline's stages.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from compressor.config import CompressionConfig
from compressor.vocabulary import JOB_STAGES

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

router = APIRouter(tags=["console"])


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def read_console() -> FileResponse:
    """Return the console's page."""
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html",
                        headers=SECURITY_HEADERS)


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
