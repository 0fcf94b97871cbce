"""What a download needs: copy while hashing, and check the sha256 the server announced."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import BinaryIO

import httpx

from compressor.client.errors import ChecksumMismatch

TransferCallback = Callable[[int, int], None]  # (bytes moved so far, bytes in total)

_CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def copy_hashing(
    response: httpx.Response, out: BinaryIO, total: int, on_progress: TransferCallback | None
) -> tuple[str, int]:
    """Write the response's body to `out`; return its sha256 and its size in bytes."""
    digest = hashlib.sha256()
    received = 0
    for chunk in response.iter_bytes(_CHUNK_BYTES):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if on_progress is not None:
            on_progress(received, total)
    return digest.hexdigest(), received


def check_digest(name: str, actual: str, expected: set[str], verify: bool) -> None:
    """Raise `ChecksumMismatch` unless `actual` is the one digest the server announced."""
    if not expected:
        if verify:
            raise ChecksumMismatch(
                f"the server gave no sha256 for {name} (no ETag, not in the job's artifact list), "
                "so the download cannot be verified; pass verify=False to accept it unchecked"
            )
        return
    if expected != {actual}:
        raise ChecksumMismatch(
            f"{name} arrived with sha256 {actual}, but the server announced "
            f"{' and '.join(sorted(expected))}; nothing was saved; download it again, and if it "
            "keeps failing the file on the server is damaged"
        )


def sha256_from_etag(etag: str | None) -> str | None:
    """Return the sha256 hex digest an ETag such as `"abc…"` or `W/"sha256:abc…"` carries."""
    if not etag:
        return None
    value = etag.removeprefix("W/").strip('"').lower()
    value = value.removeprefix("sha256:").removeprefix("sha256-")
    return value if _SHA256_HEX.fullmatch(value) else None
