"""Job files on a local (or shared, e.g. NFS) directory: `<root>/jobs/<id>/{inputs,out}/`.

Uploads stream in chunks into a hidden temporary file that is renamed into place only when
complete, so a reader never sees half a file; the core writes artifacts to `out/` the same way.
Deleting a job deletes its directory. What a try keeps for the next one (`out/resume/`, see
`compressor.runtime.resume`) survives a retry and is deleted once the job is over.

An input is kept under its fixed name (`inputs/model.pt2`) and, when the client named its file,
also reached through a link named as the client sent it (`inputs/sent/model.pt2/pickled.pt2`):
the job runs on the link, so its messages name the user's file, not ours.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from compressor.vocabulary import ARTIFACT_NAMES, RESUME_FOLDER, sha256_of

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# model.pt2 holds the model upload: a .pt2 program, or a Hugging Face checkpoint archive
# (.zip / .tar / .tar.gz), which the core tells apart by its content.
_INPUT_NAMES = ("model.pt2", "data.safetensors", "data.npz", "data.txt", "data.jsonl")
_SENT_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+ -]")
_SENT_NAME_MAX = 128


class UploadSink:
    """Write one uploaded file in chunks; `commit()` renames it into place, `abort()` removes it."""

    def __init__(self, final_path: Path, sent_path: Path | None = None) -> None:
        self.final_path = final_path
        self.sent_path = sent_path  # a link to make to the file once committed, or None
        final_path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".part",
                                    dir=final_path.parent)
        self._temp_path = Path(temp)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, chunk: bytes | bytearray) -> None:
        """Append `chunk` to the temporary file."""
        self._file.write(chunk)
        self.size += len(chunk)

    def commit(self) -> Path:
        """Flush to disk and rename the file into place; return its final path."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temp_path, self.final_path)
        if self.sent_path is not None:
            self.sent_path.parent.mkdir(parents=True, exist_ok=True)
            self.sent_path.unlink(missing_ok=True)
            self.sent_path.symlink_to(os.path.relpath(self.final_path, self.sent_path.parent))
        return self.final_path

    def abort(self) -> None:
        """Close and delete the temporary file (safe to call twice, or after commit)."""
        if not self._file.closed:
            self._file.close()
        self._temp_path.unlink(missing_ok=True)


class JobFolders:
    """Place, find and delete each job's folder of files (inputs, artifacts) under one root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.jobs_root = self.root / "jobs"
        self.jobs_root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        """Return the job's directory (not created); refuse anything but a job id."""
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_root / job_id

    def input_path(self, job_id: str, name: str) -> Path:
        """Return where the input `name` (model.pt2, data.safetensors, data.npz) is kept."""
        if name not in _INPUT_NAMES:
            raise ValueError(f"unknown input {name!r}; expected one of {_INPUT_NAMES}")
        return self.job_dir(job_id) / "inputs" / name

    def out_dir(self, job_id: str) -> Path:
        """Return the directory the job's artifacts are written to (created)."""
        path = self.job_dir(job_id) / "out"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def fresh_out_dir(self, job_id: str) -> Path:
        """Return the artifact directory for a new attempt, emptied of all but the products
        earlier attempts kept for a retry (`out/resume/`): a retry starts clean, and resumes
        from what the core finds there and trusts."""
        path = self.job_dir(job_id) / "out"
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.iterdir():
            if entry.name == RESUME_FOLDER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return path

    def delete_kept_products(self, job_id: str) -> None:
        """Delete what the job kept for a retry (it will not run again)."""
        shutil.rmtree(self.job_dir(job_id) / "out" / RESUME_FOLDER, ignore_errors=True)

    def open_upload(self, job_id: str, name: str, sent_as: str = "") -> UploadSink:
        """Start receiving the input `name` of a job, which the client sent as `sent_as`."""
        final = self.input_path(job_id, name)
        shown = sent_name(sent_as, final.suffix)
        sent = None if shown is None else final.parent / "sent" / name / shown
        return UploadSink(final, sent)

    def input_as_sent(self, job_id: str, name: str) -> Path:
        """Return the input `name` by the name the client sent it as (its fixed path if none)."""
        path = self.input_path(job_id, name)
        links = path.parent / "sent" / name
        named = sorted(links.iterdir()) if links.is_dir() else []
        return named[0] if len(named) == 1 and named[0].is_file() else path

    def artifact_path(self, job_id: str, name: str) -> Path | None:
        """Return the artifact's path if the job has one by that name."""
        if name not in ARTIFACT_NAMES:
            return None
        path = self.job_dir(job_id) / "out" / name
        return path if path.is_file() else None

    def describe_artifacts(self, job_id: str) -> list[dict[str, object]]:
        """Return name, size and sha256 of every artifact the job has, in ARTIFACT_NAMES order."""
        found = []
        for name in ARTIFACT_NAMES:
            path = self.artifact_path(job_id, name)
            if path is not None:
                found.append({"name": name, "size": path.stat().st_size, "sha256": sha256_of(path)})
        return found

    def delete_inputs(self, job_id: str) -> None:
        """Delete the job's uploads (kept only while the job may still run)."""
        shutil.rmtree(self.job_dir(job_id) / "inputs", ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        """Delete every file of the job."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def free_bytes(self) -> int:
        """Return the free space of the disk the data directory is on, in bytes."""
        return shutil.disk_usage(self.root).free

    def job_ids(self) -> list[str]:
        """Return the ids of the jobs that have a directory."""
        return sorted(p.name for p in self.jobs_root.iterdir() if _JOB_ID.match(p.name))

    def ping(self) -> None:
        """Raise if the directory cannot be written."""
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready."):
            pass


def sent_name(sent_as: str, suffix: str) -> str | None:
    """Return a safe file name that reads as the client's `sent_as` (None for none).

    Only its last path part is kept and odd characters become `_`. A data file keeps the
    suffix its format was told by (`suffix`), which the core reads it by; the model's is
    told by its content (`.pt2` stands for any).
    """
    name = sent_as.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = _SENT_NAME_CHARS.sub("_", name)[-_SENT_NAME_MAX:].lstrip(".")
    if not name:
        return None
    if suffix != ".pt2" and not name.lower().endswith(suffix):
        name += suffix
    return name
