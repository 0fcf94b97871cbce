"""Unpack an uploaded checkpoint archive (.zip, .tar, .tar.gz) into one folder, safely.

The archive is untrusted. Every member is checked before anything is written: only regular
files and folders (no symlinks, hard links, devices or FIFOs), relative names that stay inside
the destination (no `..`, no absolute or drive paths), at most `MAX_MEMBERS` members and
`MAX_TOTAL_BYTES` in all, and no zip member that expands more than `MAX_COMPRESSION_RATIO`
times. Files are then written by this code, not by `extractall`, with no more bytes than each
member declared, into new files that cannot be links.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from compressor.errors import UnsafeModelError

__all__ = ["archive_kind", "extract_archive"]

MAX_MEMBERS = 1000
MAX_TOTAL_BYTES = 64 << 30
MAX_COMPRESSION_RATIO = 200  # weights barely compress; a bomb compresses thousands of times
RATIO_CHECK_MIN_BYTES = 1 << 20
_CHUNK = 1 << 20
_HOW = ("pack the model folder as it is: `cd model-dir && zip -r ../model.zip .` or "
        "`tar czf model.tar.gz -C model-dir .`")


def archive_kind(path: Path) -> str | None:
    """Return "zip", "tar" or "tar.gz" by the file's first bytes, or None for anything else."""
    with open(path, "rb") as file:
        head = file.read(265)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def extract_archive(path: Path, dest: Path) -> None:
    """Unpack the archive at `path` into the empty folder `dest`, or raise `UnsafeModelError`."""
    kind = archive_kind(path)
    if kind == "zip":
        _extract_zip(path, dest)
    elif kind in ("tar", "tar.gz"):
        _extract_tar(path, dest)
    else:
        raise UnsafeModelError(f"{path.name} is neither a .zip nor a .tar(.gz) archive; {_HOW}")


def _safe_name(archive: Path, name: str) -> PurePosixPath | None:
    """Return the member's relative path, None for the archive's root itself; refuse escapes."""
    if "\\" in name or "\x00" in name:
        raise UnsafeModelError(
            f"{archive.name}: member {name!r} has a backslash or NUL in its name; {_HOW}")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UnsafeModelError(
            f"{archive.name}: member {name!r} has an absolute path, which would be written "
            f"outside the job's folder; {_HOW}")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafeModelError(
            f"{archive.name}: member {name!r} climbs out of the archive with '..' (a zip-slip "
            f"path); it was refused. {_HOW}")
    return PurePosixPath(*parts) if parts else None


def _check_count_and_size(archive: Path, count: int, total: int) -> None:
    if count > MAX_MEMBERS:
        raise UnsafeModelError(
            f"{archive.name} holds more than {MAX_MEMBERS} members; a model folder has a few "
            "dozen files at most. Pack only the model folder.")
    if total > MAX_TOTAL_BYTES:
        raise UnsafeModelError(
            f"{archive.name} expands to more than {MAX_TOTAL_BYTES / 2**30:.0f} GiB "
            f"({total} bytes), over this service's limit for a checkpoint.")


def _extract_zip(path: Path, dest: Path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeModelError(f"{path.name} is not a readable zip archive ({exc}); {_HOW}") from None
    with archive:
        members = archive.infolist()
        _check_count_and_size(path, len(members), sum(m.file_size for m in members))
        plan: list[tuple[PurePosixPath, zipfile.ZipInfo | None]] = []
        for info in members:
            name = _safe_name(path, info.filename)
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type given
                raise UnsafeModelError(
                    f"{path.name}: member {info.filename!r} is a {_kind(mode)}, not a file; "
                    f"links and special files are refused. {_HOW}")
            if info.flag_bits & 0x1:
                raise UnsafeModelError(f"{path.name}: member {info.filename!r} is encrypted")
            if (info.file_size >= RATIO_CHECK_MIN_BYTES
                    and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
                raise UnsafeModelError(
                    f"{path.name}: member {info.filename!r} expands {info.compress_size} bytes to "
                    f"{info.file_size} (over {MAX_COMPRESSION_RATIO}x, a zip bomb); it was "
                    "refused. Pack the model folder without such files.")
            if name is not None:
                plan.append((name, None if info.is_dir() else info))
        try:
            for name, info in plan:
                if info is None:
                    _make_dir(dest, name)
                else:
                    with archive.open(info) as source:
                        _write_file(path, dest, name, source, info.file_size)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
            raise UnsafeModelError(f"{path.name} is a damaged zip archive ({exc}); {_HOW}") from None


def _extract_tar(path: Path, dest: Path) -> None:
    compressed = path.stat().st_size
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsafeModelError(f"{path.name} is not a readable tar archive ({exc}); {_HOW}") from None
    with archive:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for member in archive:  # headers only; sizes are checked as the listing grows
                members.append(member)
                total += max(member.size, 0)
                _check_count_and_size(path, len(members), total)
                if (total >= RATIO_CHECK_MIN_BYTES
                        and total > MAX_COMPRESSION_RATIO * max(compressed, 1)):
                    raise UnsafeModelError(
                        f"{path.name} expands {compressed} bytes to more than {total} (over "
                        f"{MAX_COMPRESSION_RATIO}x, a decompression bomb); it was refused.")
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
            raise UnsafeModelError(f"{path.name} is a damaged tar archive ({exc}); {_HOW}") from None
        plan: list[tuple[PurePosixPath, tarfile.TarInfo]] = []
        for member in members:
            name = _safe_name(path, member.name)
            if not (member.isfile() or member.isdir()):
                what = ("symbolic link" if member.issym() else "hard link" if member.islnk()
                        else "device or FIFO")
                raise UnsafeModelError(
                    f"{path.name}: member {member.name!r} is a {what}, not a file; links and "
                    f"special files are refused. {_HOW}")
            if name is not None:
                plan.append((name, member))
        try:
            for name, member in plan:
                if member.isdir():
                    _make_dir(dest, name)
                    continue
                source = archive.extractfile(member)
                if source is None:
                    raise UnsafeModelError(f"{path.name}: member {member.name!r} cannot be read")
                with source:
                    _write_file(path, dest, name, source, member.size)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UnsafeModelError(f"{path.name} is a damaged tar archive ({exc}); {_HOW}") from None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "device, FIFO or socket"


def _make_dir(dest: Path, name: PurePosixPath) -> Path:
    target = dest.joinpath(*name.parts)
    for parent in (*reversed(target.relative_to(dest).parents), target.relative_to(dest)):
        folder = dest / parent
        if folder.is_symlink():  # cannot happen with the checks above; never follow one
            raise UnsafeModelError(f"refusing to write through the link {parent}")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UnsafeModelError(f"the archive holds {str(name)!r} both as a file and as a "
                               f"folder; {_HOW}") from None
    return target


def _write_file(archive: Path, dest: Path, name: PurePosixPath, source, size: int) -> None:
    parent = _make_dir(dest, name.parent) if name.parent != PurePosixPath(".") else dest
    target = parent / name.name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise UnsafeModelError(
            f"{archive.name}: the member {str(name)!r} appears twice; {_HOW}") from None
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > size:  # a member must not hold more than its header says
                raise UnsafeModelError(
                    f"{archive.name}: member {str(name)!r} holds more bytes than it declares "
                    f"({size}); the archive is damaged or crafted.")
            out.write(chunk)
