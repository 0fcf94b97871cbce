"""What an upload needs: a model folder packed into a .zip, and a file reader that counts."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def pack_folder(folder: Path) -> Iterator[Path]:
    """Zip a model folder's files (not hidden ones) into a temporary file; yield its path."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{folder} holds no files to upload")
    with tempfile.TemporaryDirectory(prefix="compressor-upload-") as tmp:
        packed = Path(tmp) / f"{folder.resolve().name or 'model'}.zip"
        with zipfile.ZipFile(packed, "w") as archive:
            for path in files:
                method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(folder).as_posix(), compress_type=method)
        yield packed


class ProgressReader:
    """Give httpx's multipart encoder a file to read in chunks, counting the bytes read."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.position = 0
        self.on_read: Callable[[], None] | None = None

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self.position += len(chunk)
        if chunk and self.on_read is not None:
            self.on_read()
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = self._file.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()
