"""What a download needs: resume a partial file, copy while hashing, check the announced sha256.

A download streams into `<dest>.part`; the ETag it came with is kept beside it in
`<dest>.part.etag`. A later attempt (a retry after the connection dropped, or another run after
the process was stopped) hashes the bytes the part already holds and asks for the rest with
`Range: bytes=N-` and `If-Range: <that ETag>`: the server answers 206 with the rest while the file
is unchanged, or 200 with the whole (new) file, and then the part starts over. The digest covers
every byte of the file either way, and the part becomes `<dest>` only once it matches.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

import httpx

from compressor.client.errors import ChecksumMismatch, ClientError, ConnectionFailed, NotFoundError

TransferCallback = Callable[[int, int], None]  # (bytes moved so far, bytes in total)
OpenStream = Callable[[dict[str, str]], AbstractContextManager[httpx.Response]]  # headers -> GET

DEFAULT_RETRIES = 3  # a dropped connection is resumed this many times before giving up
RETRY_WAIT_S = 0.5  # before the first retry; doubled for each one after, up to _MAX_WAIT_S
_MAX_WAIT_S = 8.0
_CHUNK_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _BrokenOff(Exception):
    """The body ended before its Content-Length: resume from what arrived."""


class _StartOver(Exception):
    """The part cannot be resumed (the server answered 416): it was emptied, download it all."""


class PartFile:
    """`<dest>.part`, the bytes received so far, and the ETag they were sent with."""

    def __init__(self, dest: Path) -> None:
        self.path = dest.with_name(dest.name + ".part")
        self.etag_path = dest.with_name(dest.name + ".part.etag")

    def held(self) -> tuple[int, str | None]:
        """Return (bytes held, their ETag); (0, None) when there is nothing to resume from.

        A part without its ETag (the server sent none, or it was lost) cannot be resumed safely:
        it is emptied.
        """
        etag = self.etag_path.read_text().strip() if self.etag_path.is_file() else ""
        size = self.path.stat().st_size if self.path.is_file() else 0
        if not etag or not size:
            self.discard()
            return 0, None
        return size, etag

    def digest_of_held(self, size: int) -> hashlib._Hash:
        """Return a sha256 fed with the first `size` bytes of the part."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as held:
            while size > 0 and (chunk := held.read(min(_CHUNK_BYTES, size))):
                digest.update(chunk)
                size -= len(chunk)
        return digest

    def open_at(self, offset: int, etag: str | None) -> BinaryIO:
        """Open the part for writing from `offset` (0: empty it), remembering `etag`."""
        if etag:
            self.etag_path.write_text(etag)
        else:
            self.etag_path.unlink(missing_ok=True)
        out = open(self.path, "r+b" if offset and self.path.is_file() else "wb")
        out.truncate(offset)
        out.seek(offset)
        return out

    def finish(self, dest: Path) -> Path:
        """Rename the part to `dest` and forget its ETag."""
        os.replace(self.path, dest)
        self.etag_path.unlink(missing_ok=True)
        return dest

    def discard(self) -> None:
        """Delete the part and its ETag."""
        for path in (self.path, self.etag_path):
            path.unlink(missing_ok=True)


def download_resuming(
    open_stream: OpenStream,
    name: str,
    dest: Path,
    listed_sha256: str | None,
    listed_size: int | None = None,
    *,
    on_progress: TransferCallback | None,
    verify: bool,
    retries: int = DEFAULT_RETRIES,
) -> Path:
    """Save the artifact `name` at `dest` through `<dest>.part`, resuming it; return `dest`.

    `open_stream(headers)` sends the GET. A dropped connection or a short body is resumed up to
    `retries` times (then `ConnectionFailed`, and the part stays for the next run to resume); a
    digest other than the one announced (the ETag and `listed_sha256`) deletes the part and
    raises `ChecksumMismatch`; a 404 deletes it too. A part that already holds the whole listed
    file (the last run stopped just before the rename) is checked without a request.
    """
    part = PartFile(dest)
    complete = _complete_part(part, listed_sha256, listed_size)
    if complete is not None:
        return complete.finish(dest)
    failures = 0
    while True:
        try:
            digest, expected = _transfer(open_stream, part, on_progress)
            break
        except _StartOver:
            continue  # the part is empty now, so the next request sends no Range
        except (ConnectionFailed, _BrokenOff) as exc:
            failures += 1
            if failures > retries:
                held = part.path.stat().st_size if part.path.is_file() else 0
                raise ConnectionFailed(
                    f"the download of {name} broke off {failures} times ({exc}); the "
                    f"{held} bytes received are kept in {part.path}: download it again to resume"
                ) from exc
            time.sleep(min(RETRY_WAIT_S * 2 ** (failures - 1), _MAX_WAIT_S))
        except NotFoundError:
            part.discard()
            raise
    if listed_sha256:
        expected.add(listed_sha256.lower())
    try:
        check_digest(name, digest, expected, verify)
    except ChecksumMismatch:
        part.discard()
        raise
    return part.finish(dest)


def _complete_part(
    part: PartFile, listed_sha256: str | None, listed_size: int | None
) -> PartFile | None:
    """Return `part` if it holds exactly the listed file already, else None."""
    if not (listed_sha256 and listed_size):
        return None
    held, _ = part.held()
    if held != listed_size:
        return None
    return part if part.digest_of_held(held).hexdigest() == listed_sha256.lower() else None


def _transfer(
    open_stream: OpenStream, part: PartFile, on_progress: TransferCallback | None
) -> tuple[str, set[str]]:
    """Fill the part from where it stops; return its sha256 and the digests announced."""
    offset, etag = part.held()
    headers = {"Accept": "*/*"}
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": etag or ""}
    try:
        with open_stream(headers) as response:
            if offset and not _continues_at(response, offset):
                offset = 0  # a 200: the file changed since (or ranges are not served)
            digest = part.digest_of_held(offset) if offset else hashlib.sha256()
            new_etag = response.headers.get("etag")
            length = int(response.headers.get("content-length") or 0)
            total = offset + length if length else 0
            with part.open_at(offset, new_etag) as out:
                received = copy_hashing(response, out, total, on_progress, digest, offset)
                out.flush()
                os.fsync(out.fileno())
    except ClientError as exc:
        if exc.status_code != 416 or not offset:
            raise
        part.discard()  # the part is as long as the file, or longer: it cannot be resumed
        raise _StartOver from None
    if length and received - offset != length:
        raise _BrokenOff(f"the body ended after {received} of {total} bytes")
    announced = sha256_from_etag(new_etag)
    return digest.hexdigest(), {announced} if announced else set()


def _continues_at(response: httpx.Response, offset: int) -> bool:
    """Return whether the response is the rest of the file from byte `offset` (a 206)."""
    if response.status_code != 206:
        return False
    matched = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return matched is not None and int(matched.group(1)) == offset


def copy_hashing(
    response: httpx.Response,
    out: BinaryIO,
    total: int,
    on_progress: TransferCallback | None,
    digest: hashlib._Hash,
    start: int = 0,
) -> int:
    """Write the response's body to `out`, feeding `digest`; return the bytes held in all.

    `start` bytes were held before this body (progress counts from there).
    """
    received = start
    for chunk in response.iter_bytes():  # as they arrive: a drop loses no byte received
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if on_progress is not None:
            on_progress(received, total)
    return received


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
