"""What a job keeps for a retry: its products in `<out_dir>/resume/`, trusted only when checked.

A retried job (the same `out_dir`: the service's job folder, or a library call run again) goes
on from what the interrupted try kept instead of starting over. Each product is a folder of
`resume/` holding one safetensors file and `product.json`, which names that file with its
sha256 and records the *key* the product was made for: a digest of the job's inputs (the
upload's bytes, the data file's bytes, the config, the versions that compute the product) and
of whatever else the product depends on (the plan, for a fine-tuning checkpoint). Both files
are written to a temporary name and renamed into place, `product.json` last, so a reader sees
the previous product or the new one, never half of one.

A product is used only when its key is the one the retry computes and its tensors file is
exactly the one recorded (size, sha256): a product made for other inputs, truncated, edited or
half-written is discarded (the caller logs why) and the work is redone. Nothing kept is ever
unpickled: tensors are safetensors, the rest JSON. The digest is not keyed by a secret: it
detects changed inputs and damaged files, not a forger who can write to the job's folder (who
could as well replace the upload).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from compressor.runtime.memory import format_bytes
from compressor.vocabulary import RESUME_FOLDER, sha256_of

__all__ = ["RESUME_FOLDER", "KeptRecord", "ResumeFolder", "UntrustedProduct",
           "kept_bytes_estimate", "read_product", "write_product"]
PRODUCT_FORMAT = 1  # bumped when a product's layout changes: older products are discarded
_RECORD = "product.json"
# Config fields that cannot change any product: a retry that changes them still resumes.
_NOT_INPUTS = {"timeout_s": True,
               "finetune": {"checkpoint_every": True, "checkpoint_minutes": True}}
# Tensors the size of θ in a fine-tuning checkpoint: θ, AdamW's two moments, the best θ.
CHECKPOINT_THETA_COPIES = 4


class UntrustedProduct(Exception):
    """A kept product that must not be used: it says why (the caller logs it and redoes the work)."""


class ResumeFolder:
    """The products one job keeps in `path` for a retry, and the digest of the job's inputs.

    `model` and `data` are the job's input files (a folder: every file in it, by relative
    path); `config` is the job's config as JSON-able data with its defaults filled. The inputs
    are hashed once, when a product is first written or read.
    """

    def __init__(self, path: Path, model: Path, data: Path | None, config: dict[str, Any],
                 reserve_bytes: int | None = None) -> None:
        self.path = path
        self._model = model
        self._data = data
        self._config = config
        # Disk a product must leave free beside it (the job's artifacts); None: its own size.
        self.reserve_bytes = reserve_bytes
        # What this try took from an earlier one, in the order it was taken, and where it
        # resumed (`summary`).
        self.reused: list[str] = []
        self.resumed_at: str | None = None

    @cached_property
    def inputs_digest(self) -> str:
        """The sha256 naming the job's inputs: upload, data, config, format and versions."""
        config = _without(self._config, _NOT_INPUTS)
        parts = {"format": PRODUCT_FORMAT, "torch": torch.__version__,
                 "model": tree_sha256(self._model),
                 "data": None if self._data is None else tree_sha256(self._data),
                 "config": config}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def key(self, *parts: str) -> str:
        """Return the key of a product made from the job's inputs and `parts`."""
        digest = hashlib.sha256(self.inputs_digest.encode())
        for part in parts:
            digest.update(b"\0" + part.encode())
        return digest.hexdigest()

    def product(self, name: str) -> Path:
        """Return the folder of the product `name` (not created)."""
        return self.path / name

    def summary(self) -> str | None:
        """Return where this try resumed and what it reused ("resumed at fine-tuning step 4 of
        8; reused: decompositions (2 of 2 layers), θ as corrected"), or None: nothing yet."""
        if not self.reused:
            return None
        where = f"resumed at {self.resumed_at}" if self.resumed_at else "resumed"
        return f"{where}; reused: {', '.join(self.reused)}"

    def size_bytes(self) -> int:
        """Return the bytes the kept products take on disk."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def delete_product(self, folder: Path) -> None:
        """Delete one product (it must not be trusted)."""
        shutil.rmtree(folder, ignore_errors=True)

    def delete(self) -> None:
        """Delete every kept product (the job is over, or they must not be trusted)."""
        shutil.rmtree(self.path, ignore_errors=True)


def kept_bytes_estimate(weight_bytes: int, theta_share: float,
                        checkpoints: bool) -> dict[str, int]:
    """Return the most disk a job's kept products take at once, by product, for a model of
    `weight_bytes` float weights whose θ is at most `theta_share` of them (`checkpoints`:
    fine-tuning keeps checkpoints).

    Calibration's decompositions take at most the weights' bytes (lowrank keeps a layer's A up
    to its break-even rank, and B only where A and B together store fewer numbers than W); θ
    as corrected, at most `theta_share` of them; a checkpoint, `CHECKPOINT_THETA_COPIES` × θ,
    twice over while the next one replaces it (the old one goes once the new one is whole).
    """
    theta = int(theta_share * weight_bytes)
    estimate = {"decompositions": weight_bytes, "θ": theta}
    if checkpoints:
        estimate["fine-tuning checkpoints"] = 2 * CHECKPOINT_THETA_COPIES * theta
    return estimate


def write_product(folder: Path, key: str, tensors: dict[str, torch.Tensor],
                  record: dict[str, Any], reserve: int | None = None) -> int:
    """Write a product atomically: `tensors` as safetensors, then `record` (JSON) naming them
    with their sha256 under `key`; remove the product's earlier tensors file. Return the bytes
    of the tensors file.

    Until the new `product.json` replaces the old one, the old product stays whole and
    readable, so a kill at any point leaves one complete product (or none, the first time).
    Raises `OSError` (ENOSPC) without writing when the disk would keep less than `reserve`
    free beside it (None: the product's own size): kept products must never take the room the
    job's artifacts need.
    """
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    reserve = needed if reserve is None else reserve
    free = free_disk_bytes(folder)
    if free is not None and needed + reserve > free:
        raise OSError(errno.ENOSPC, f"it takes {format_bytes(needed)} and the disk has "
                      f"{format_bytes(free)} free; a product is kept only when "
                      f"{format_bytes(reserve)} more stays free for the job's artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{secrets.token_hex(4)}.safetensors"
    temps = [folder / f".{name}.tmp", folder / f".{_RECORD}.tmp"]
    try:
        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()},
                  str(temps[0]))
        _fsync(temps[0])
        os.replace(temps[0], folder / name)
        document = {**record, "format": PRODUCT_FORMAT, "key": key,
                    "tensor_names": sorted(tensors),
                    "tensors": {"file": name, "bytes": (folder / name).stat().st_size,
                                "sha256": sha256_of(folder / name)}}
        temps[1].write_text(json.dumps(document))
        _fsync(temps[1])
        os.replace(temps[1], folder / _RECORD)
    except BaseException:
        for path in (*temps, folder / name):  # the product before this write stays as it was
            path.unlink(missing_ok=True)
        raise
    _fsync(folder)
    for stale in folder.iterdir():  # the earlier product's tensors, temporary files of a kill
        if stale.name not in (name, _RECORD):
            stale.unlink(missing_ok=True)
    return document["tensors"]["bytes"]


def read_product(folder: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """Return the tensors file and the record of the product in `folder`, or None when there is
    none. Read the tensors one at a time (`safetensors.safe_open`): a checkpoint's are several
    times θ.

    Raises `UntrustedProduct` when the product was made for another key or its files are not
    exactly the ones recorded (truncated, edited, half-written).
    """
    path = folder / _RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        tensors_file = folder / record["tensors"]["file"]
        recorded_bytes, recorded_sha256 = record["tensors"]["bytes"], record["tensors"]["sha256"]
        made_for, made_as = record["key"], record["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UntrustedProduct(f"its {_RECORD} cannot be read ({type(exc).__name__}: {exc})") \
            from None
    if made_as != PRODUCT_FORMAT:
        raise UntrustedProduct(f"it is in format {made_as!r}, this version reads {PRODUCT_FORMAT}")
    if made_for != key:
        raise UntrustedProduct("it was made for other inputs (the upload, the data, the config, "
                               "the plan or the torch version differ)")
    if tensors_file.parent != folder or not tensors_file.is_file():
        raise UntrustedProduct(f"its tensors file {tensors_file.name} is missing")
    size = tensors_file.stat().st_size
    if size != recorded_bytes or sha256_of(tensors_file) != recorded_sha256:
        raise UntrustedProduct(f"its tensors file {tensors_file.name} is not the one written "
                               f"({size} bytes, {recorded_bytes} recorded; sha256 differs): "
                               "truncated or altered")
    try:
        with safe_open(str(tensors_file), framework="pt") as kept:
            names = set(kept.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise UntrustedProduct(f"its tensors file cannot be read ({exc})") from None
    if names != set(record.get("tensor_names", names)):
        raise UntrustedProduct("its tensors file does not hold the tensors recorded")
    return tensors_file, record


class KeptRecord:
    """A product that is plain data (its record's `data`, JSON; no tensors): what a stage
    decided or measured, kept so that a retry does not decide or measure it again.

    `name` is its folder in `resume/`, `parts` what it depends on beyond the job's inputs (its
    key covers them), `what` names it in the log lines of `log`.
    """

    def __init__(self, resume: ResumeFolder, name: str, parts: tuple[str, ...], what: str,
                 log: Callable[[str], None]) -> None:
        self.resume = resume
        self.folder = resume.product(name)
        self.key = resume.key(name, *parts)
        self.what = what
        self.log = log

    def load(self) -> Any | None:
        """Return the kept data, or None when none is kept or it cannot be trusted (then it is
        deleted and the log says why)."""
        try:
            found = read_product(self.folder, self.key)
            if found is None:
                return None
            if "data" not in found[1]:
                raise UntrustedProduct("its record holds no data")
        except UntrustedProduct as exc:
            self.log(f"{self.what}: the kept one discarded: {exc}; computed again")
            self.resume.delete_product(self.folder)
            return None
        return found[1]["data"]

    def save(self, data: Any) -> None:
        """Keep `data` (JSON-able), replacing what was kept; a write that fails is logged."""
        try:
            write_product(self.folder, self.key, {}, {"data": data}, reserve=0)
        except OSError as exc:
            self.log(f"{self.what}: not kept ({exc.strerror or exc}); a retry computes it again")

    def delete(self) -> None:
        """Drop what is kept."""
        self.resume.delete_product(self.folder)


def fitting(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Return a kept tensor that has its parameter's shape and dtype; raise `UntrustedProduct`
    otherwise."""
    if tensor.shape != param.shape or tensor.dtype != param.dtype:
        raise UntrustedProduct(f"a kept tensor is {tuple(tensor.shape)} {tensor.dtype}, its "
                               f"parameter {tuple(param.shape)} {param.dtype}")
    return tensor


def free_disk_bytes(folder: Path) -> int | None:
    """Return the free bytes of the disk `folder` is (or will be) on; None if unknown."""
    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None


def tree_sha256(path: Path) -> str:
    """Return the sha256 of a file, or of a folder's files (relative paths and contents)."""
    if not path.is_dir():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\0".encode())
    return digest.hexdigest()


def _without(data: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Return `data` less the (nested) `fields`."""
    kept = {}
    for name, value in data.items():
        drop = fields.get(name)
        if drop is True:
            continue
        kept[name] = _without(value, drop) if isinstance(drop, dict) and isinstance(
            value, dict) else value
    return kept


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to disk, where the platform allows."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
