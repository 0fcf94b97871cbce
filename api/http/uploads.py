"""Receive the multipart body of `POST /v1/jobs` as a stream, writing files to disk in chunks.

Starlette's form parser is not used: it would spool whole files. Here the body is fed to
python-multipart's streaming parser chunk by chunk; file bytes are buffered up to 1 MiB, then
written by a worker thread. The sizes are checked as they grow (413 the moment the limit is
passed), the config is validated as soon as its part ends, and file types are checked by their
first bytes. On any failure everything written for the job is deleted (and the error answer
closes the connection, see `api.http.errors`, so the rest of the body is not received).

Before a byte is stored, the data directory must have room for the upload, for its job's
artifacts and for a reserve (`check_free_space`): 507 otherwise. Once the job's config is known
(its part ended, or the body ended without one), the room is checked again against everything the
job will keep on disk (`check_job_space`: the core's own estimate, which the job applies again
when it starts), so a job that could never run is refused at upload, not after. A disk that fills
up all the same (another upload, another process) answers the same 507, and the partial file is
deleted.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.http.errors import ApiError
from api.jobs.folders import JobFolders, UploadSink
from api.jobs.service import Submission
from compressor.config import CompressionConfig
from compressor.load.stage import describe_disk_bytes, disk_advice, job_disk_bytes
from compressor.runtime.memory import format_bytes
from compressor.vocabulary import (
    HOW_TO_EXPORT,
    HOW_TO_GIVE_CHECKPOINT,
    ErrorCode,
    describe_validation_error,
    field_errors,
)

FORM_OVERHEAD = 1 << 20  # boundaries, part headers and the config field, on top of the files
# A job's artifacts take about twice its upload (the core's own estimate when the job starts,
# `compressor.pipeline.check_resources`): an upload needs room for itself and for them.
ARTIFACT_BYTES_PER_UPLOAD_BYTE = 2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_CONFIG_BYTES = 256 << 10
_FLUSH_BYTES = 1 << 20
_MAGIC_BYTES = 262  # a zip (PK\3\4), gzip, safetensors (u64 length, "{"), tar ("ustar" at 257)
_TEXT_SUFFIXES = ("txt", "jsonl")

HOW_TO_MAKE_ROOM = (
    "Delete finished jobs you no longer need (DELETE /v1/jobs/{id}) or ask the operator to give "
    "COMPRESSOR_DATA_DIR more space, then submit again"
)
HOW_TO_UPLOAD_CHECKPOINT = (
    f"{HOW_TO_GIVE_CHECKPOINT} (`compressor submit model-dir/` zips a folder for you.)"
)
HOW_TO_SEND = (
    "send multipart/form-data with a `model` file, an optional `config` JSON field and an optional "
    "`data` file, e.g. `curl -F model=@model.pt2 -F 'config={\"ratio\": 0.5}' .../v1/jobs`"
)


def too_large(limit: int) -> ApiError:
    """Return the 413 for an upload over `limit` bytes."""
    return ApiError(
        413, ErrorCode.PAYLOAD_TOO_LARGE,
        f"the upload is larger than this server's limit of {limit} bytes "
        f"({limit / 2**30:.2f} GiB); shrink the model or data file, or raise "
        "COMPRESSOR_MAX_UPLOAD_BYTES on the server",
    )


def check_content_length(request: Request, limit: int) -> int | None:
    """Return the declared body size; answer 413 before reading anything when it is too large."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit + FORM_OVERHEAD:
        raise too_large(limit)
    return int(declared)


def space_needed(upload_bytes: int, reserve: int) -> int:
    """Return the free space an upload needs: itself, its job's artifacts and the reserve."""
    return upload_bytes * (1 + ARTIFACT_BYTES_PER_UPLOAD_BYTE) + reserve


def no_room(upload_bytes: int | None, free: int, reserve: int, *, received: int | None = None
            ) -> ApiError:
    """Return the 507 for an upload the data directory has no room for."""
    size = "an upload of unknown size" if upload_bytes is None else (
        f"this upload of {format_bytes(upload_bytes)}")
    needed = space_needed(upload_bytes or 0, reserve)
    what = (
        f"the server's disk filled up after {format_bytes(received)} of the upload were "
        "received; nothing was kept. "
        if received is not None else ""
    )
    return ApiError(
        507, ErrorCode.INSUFFICIENT_RESOURCES,
        f"{what}The server's data directory has {format_bytes(free)} ({free} bytes) free and "
        f"{size} needs {format_bytes(needed)} ({needed} bytes): the upload, about "
        f"{ARTIFACT_BYTES_PER_UPLOAD_BYTE}x its size for the job's artifacts, and "
        f"{format_bytes(reserve)} kept free (COMPRESSOR_DISK_RESERVE_BYTES). {HOW_TO_MAKE_ROOM}",
    )


def check_free_space(free: int, upload_bytes: int | None, reserve: int) -> None:
    """Answer 507 unless `free` bytes hold the upload, its job's artifacts and the reserve.

    An upload of unknown size (no Content-Length) needs the reserve at least; past it, a full
    disk is caught as it happens.
    """
    if space_needed(upload_bytes or 0, reserve) > free:
        raise no_room(upload_bytes, free, reserve)


def check_job_space(free: int, upload_bytes: int, written: int, config: CompressionConfig,
                    reserve: int) -> None:
    """Answer 507 unless `free` bytes hold the rest of the upload (`upload_bytes`, of which
    `written` are stored), what the job with `config` will keep on disk and the reserve.

    The job's disk is the core's estimate (`job_disk_bytes`) with the upload's bytes as its
    weights; the job checks it again on the weights as loaded when it starts.
    """
    disk = job_disk_bytes(upload_bytes, config)
    needed = max(0, upload_bytes - written) + sum(disk.values()) + reserve
    if needed <= free:
        return
    raise ApiError(
        507, ErrorCode.INSUFFICIENT_RESOURCES,
        f"the server's data directory has {format_bytes(free)} ({free} bytes) free and this job "
        f"needs {format_bytes(needed)} ({needed} bytes) more: for an upload of "
        f"{format_bytes(upload_bytes)}, {describe_disk_bytes(disk)}, and "
        f"{format_bytes(reserve)} kept free (COMPRESSOR_DISK_RESERVE_BYTES); nothing was kept. "
        f"{HOW_TO_MAKE_ROOM}{disk_advice(disk)}",
    )


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"expected multipart/form-data: {HOW_TO_SEND}")
    if not params.get(b"boundary"):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, f"multipart body without a boundary: {HOW_TO_SEND}")
    return params[b"boundary"]


@dataclass
class _Part:
    """One part of the form as it streams in."""

    name: str
    filename: str = ""
    buffer: bytearray = field(default_factory=bytearray)
    head: bytes = b""
    size: int = 0
    complete: bool = False
    checked: bool = False
    sink: UploadSink | None = None


class _FormReceiver:
    """Feed body chunks to the parser; keep parts, sizes and sinks; write and check parts."""

    FILE_PARTS = ("model", "data")

    def __init__(self, files: JobFolders, job_id: str, limit: int, boundary: bytes,
                 declared: int | None = None, reserve: int = 0) -> None:
        self.files = files
        self.job_id = job_id
        self.limit = limit
        self.declared = declared  # the body's Content-Length, when the client sent one
        self.reserve = reserve
        self.file_bytes = 0
        self.body_bytes = 0
        self.parts: dict[str, _Part] = {}
        self.pending: list[_Part] = []
        self.config: dict[str, Any] | None = None
        self.data_format: str | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        })

    # -- parser callbacks: bookkeeping only, no disk I/O ---------------------------------------

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in ("model", "config", "data"):
            raise ApiError(422, ErrorCode.INVALID_REQUEST, f"unknown form field {name!r}: {HOW_TO_SEND}")
        if name in self.parts:
            raise ApiError(422, ErrorCode.INVALID_REQUEST, f"the form field {name!r} was sent twice")
        part = _Part(name, options.get(b"filename", b"").decode("utf-8", "replace"))
        self.parts[name] = part
        self.pending.append(part)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.pending[-1]
        size = end - start
        part.size += size
        if len(part.head) < _MAGIC_BYTES:
            part.head += data[start:min(end, start + _MAGIC_BYTES)]
        if part.name in self.FILE_PARTS:
            self.file_bytes += size
            if self.file_bytes > self.limit:
                raise too_large(self.limit)
        elif part.size > MAX_CONFIG_BYTES:
            raise ApiError(
                413, ErrorCode.PAYLOAD_TOO_LARGE,
                f"the config field is over {MAX_CONFIG_BYTES} bytes; a job config is a few lines",
            )
        part.buffer += data[start:end]

    def _on_part_end(self) -> None:
        self.pending[-1].complete = True

    # -- the async side: feed, check, write -----------------------------------------------------

    async def feed(self, chunk: bytes) -> None:
        """Parse one body chunk, then check and write whatever it completed."""
        self.body_bytes += len(chunk)
        if self.body_bytes > self.limit + FORM_OVERHEAD:
            raise too_large(self.limit)
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise ApiError(
                422, ErrorCode.INVALID_REQUEST, f"malformed multipart body ({exc}): {HOW_TO_SEND}"
            ) from None
        for part in list(self.pending):
            await self._advance(part)
            if part.complete:
                self.pending.remove(part)

    async def _advance(self, part: _Part) -> None:
        if part.name == "config":
            if part.complete:
                self.config = validate_config(bytes(part.buffer))
                if self.declared is not None:  # the files are at most the body
                    await self.check_room(self.declared)
            return
        if not part.checked and (len(part.head) >= _MAGIC_BYTES or part.complete):
            self._check_file_type(part)
            part.checked = True
        if part.checked and (len(part.buffer) >= _FLUSH_BYTES or part.complete):
            chunk, part.buffer = part.buffer, bytearray()
            await anyio.to_thread.run_sync(self._write, part, chunk)
        if part.complete and part.sink is not None:
            await anyio.to_thread.run_sync(part.sink.commit)

    async def check_room(self, upload_bytes: int) -> None:
        """507 unless the disk holds the rest of an upload of `upload_bytes` and what its job
        (its config, or the defaults) will keep; nothing of the job is kept then."""
        config = CompressionConfig.model_validate(self.config or {})
        free = await anyio.to_thread.run_sync(self.files.free_bytes)
        written = sum(part.sink.size for part in self.parts.values() if part.sink is not None)
        check_job_space(free, upload_bytes, written, config, self.reserve)

    def _write(self, part: _Part, chunk: bytearray) -> None:
        if part.sink is None:
            name = "model.pt2" if part.name == "model" else f"data.{self.data_format}"
            part.sink = self.files.open_upload(self.job_id, name, sent_as=part.filename)
        part.sink.write(chunk)

    def _check_file_type(self, part: _Part) -> None:
        is_zip = part.head.startswith(b"PK\x03\x04")
        # The file's content is wrong: the codes the job would fail with (invalid_model,
        # invalid_data), so that the service and `compressor compress` say the same.
        if part.name == "model":
            shown = f"the model file {part.filename!r}" if part.filename else "the model file"
            if part.size == 0:
                raise ApiError(422, ErrorCode.INVALID_MODEL,
                               f"{shown} is empty. {HOW_TO_EXPORT} {HOW_TO_UPLOAD_CHECKPOINT}")
            is_tar = part.head.startswith(b"\x1f\x8b") or part.head[257:262] == b"ustar"
            if not (is_zip or is_tar):
                raise ApiError(
                    415, ErrorCode.INVALID_MODEL,
                    f"{shown} is not a .pt2 program (a .pt2 is a zip archive; this file "
                    f"starts with {part.head[:4]!r}) nor a checkpoint archive. {HOW_TO_EXPORT} "
                    f"{HOW_TO_UPLOAD_CHECKPOINT}",
                )
            return
        suffix = part.filename.rsplit(".", 1)[-1].lower() if "." in part.filename else ""
        if suffix in _TEXT_SUFFIXES:
            if b"\x00" in part.head:
                raise ApiError(415, ErrorCode.INVALID_DATA,
                               f"the data file {part.filename!r} is not text; a .{suffix} file "
                               "holds UTF-8 text, one sample a line")
            self.data_format = suffix
        elif is_zip:
            self.data_format = "npz"
        elif len(part.head) >= 9 and part.head[8:9] == b"{":
            self.data_format = "safetensors"
        else:
            raise ApiError(
                415, ErrorCode.INVALID_DATA,
                f"the data file {part.filename!r} is neither .safetensors nor .npz: save a dict of tensors named "
                "after the model's inputs with `safetensors.torch.save_file(...)` or "
                "`numpy.savez(...)`; for a Hugging Face checkpoint, text also works: a .txt "
                "file (one sample a line) or .jsonl (a \"text\" field a line)",
            )

    def finish(self) -> Submission:
        """Return the submission once the body ended; 422 if the model is missing or cut off."""
        self.parser.finalize()
        if any(not part.complete for part in self.parts.values()):
            raise ApiError(
                422, ErrorCode.INVALID_REQUEST, "the upload ended before its last part was complete"
            )
        if "model" not in self.parts:
            raise ApiError(
                422, ErrorCode.INVALID_REQUEST, f"the form has no `model` file: {HOW_TO_SEND}",
                details=[{"field": "model", "message": "field required"}],
            )
        config = self.config if self.config is not None else CompressionConfig().to_dict()
        model_name = self.parts["model"].filename.replace("\\", "/").rsplit("/", 1)[-1]
        return Submission(config=config, data_format=self.data_format,
                          model_name=model_name or None)

    def abort(self) -> None:
        """Delete every file written for this job."""
        for part in self.parts.values():
            if part.sink is not None:
                part.sink.abort()
        self.files.delete_job(self.job_id)


def validate_config(raw: bytes) -> dict[str, Any]:
    """Return the config with defaults filled; 422 naming every offending field otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, ErrorCode.INVALID_CONFIG, "the config field is not UTF-8 text") from None
    try:
        config = CompressionConfig.model_validate_json(text.strip() or "{}")
    except ValidationError as exc:
        raise ApiError(
            422, ErrorCode.INVALID_CONFIG, describe_validation_error(exc),
            details=field_errors(list(exc.errors())),
        ) from None
    return config.to_dict()


async def receive_job(
    request: Request, files: JobFolders, job_id: str, limit: int, reserve: int = 0
) -> Submission:
    """Stream the form of `request` into the job's inputs and return its validated parts.

    `limit` caps the files' bytes (413); the data directory must hold the upload, what its job
    will keep on disk and `reserve` bytes more (507).
    """
    declared = check_content_length(request, limit)
    check_free_space(await anyio.to_thread.run_sync(files.free_bytes), declared, reserve)
    receiver = _FormReceiver(files, job_id, limit, _boundary(request), declared, reserve)
    try:
        async for chunk in request.stream():
            if chunk:
                await receiver.feed(chunk)
        submission = receiver.finish()
        await receiver.check_room(receiver.file_bytes)
        return submission
    except ClientDisconnect:
        receiver.abort()
        raise ApiError(400, ErrorCode.CLIENT_DISCONNECTED, "the client went away mid-upload") from None
    except OSError as exc:
        receiver.abort()
        if exc.errno not in _DISK_FULL:
            raise
        free = files.free_bytes()
        raise no_room(declared, free, reserve, received=receiver.body_bytes) from None
    except BaseException:
        receiver.abort()  # synchronous: it must run even when the request is being cancelled
        raise

