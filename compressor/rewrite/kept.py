"""θ as initialized and corrected sequentially, kept for a retried job, and for the target search.

The sequential correction runs the original and the student over samples, layer by layer: on a
large model it is minutes. The rewriting stage keeps θ once it is corrected, and a retry that
finds it copies it into its freshly parametrized student instead of correcting again. A
`compressor.runtime.resume` product: keyed by the job's inputs, the plan, the gradient
reduction and the correction's samples; discarded (logged) unless everything checks.

Within one job, the target search builds the student of one budget several times (scored in
float, then with int8, with int4, exported for its size, then fine-tuned as a finalist):
`CorrectedThetas` keeps each budget's corrected θ in the job's scratch folder for the job's
length, so that each budget is corrected once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.plan.planning import Plan
from compressor.runtime.resume import (
    ResumeFolder,
    UntrustedProduct,
    fitting,
    free_disk_bytes,
    read_product,
    write_product,
)


class KeptInitialization:
    """Where the rewriting stage keeps θ after initialization, for the plan it rewrites."""

    def __init__(self, resume: ResumeFolder, plan: Plan, settings: str,
                 log: Callable[[str], None]) -> None:
        described = json.dumps(plan.to_dict(), sort_keys=True, default=str)
        self.folder = resume.product(
            f"rewrite-{hashlib.sha256(described.encode()).hexdigest()[:16]}")
        self.key = resume.key("rewrite", described, settings)
        self.resume = resume
        self.log = log

    def load_(self, params: list[nn.Parameter]) -> bool:
        """Copy the kept θ into `params`; return False when none is kept or it cannot be
        trusted (then it is deleted and the log says why)."""
        try:
            found = read_product(self.folder, self.key)
            if found is None:
                return False
            with safe_open(str(found[0]), framework="pt") as kept:
                tensors = [fitting(kept.get_tensor(f"theta.{i}"), param)
                           for i, param in enumerate(params)]
                if len(kept.keys()) != len(params):
                    raise UntrustedProduct(f"it holds {len(kept.keys())} tensors, θ has "
                                           f"{len(params)}")
        except (UntrustedProduct, KeyError, ValueError) as exc:
            self.log(f"rewriting: the kept θ discarded: {exc}; θ is corrected again")
            self.resume.delete_product(self.folder)
            return False
        with torch.no_grad():
            for tensor, param in zip(tensors, params, strict=True):
                param.copy_(tensor)
        self.log("rewriting: reused θ as an earlier try corrected it (no sequential correction)")
        return True

    def save(self, params: list[nn.Parameter]) -> None:
        """Keep θ as it is now (a write that fails is logged; the job goes on)."""
        try:
            write_product(self.folder, self.key,
                          {f"theta.{i}": p.detach() for i, p in enumerate(params)}, {},
                          self.resume.reserve_bytes)
        except OSError as exc:
            self.log(f"rewriting: θ not kept ({exc}); a retry corrects it again")


class CorrectedThetas:
    """θ as corrected for each plan a job has built a student of, kept in `folder` (the job's
    scratch: removed when the job ends) and copied into the next student of the same plan
    instead of correcting it again. A θ is not kept when writing it would leave less than
    `reserve_bytes` free on the disk (the artifacts need it)."""

    def __init__(self, folder: Path, reserve_bytes: int, log: Callable[[str], None]) -> None:
        self.folder, self.reserve_bytes, self.log = Path(folder), reserve_bytes, log

    def _path(self, plan: Plan, settings: str) -> Path:
        described = json.dumps(plan.to_dict(), sort_keys=True, default=str) + settings
        return self.folder / f"{hashlib.sha256(described.encode()).hexdigest()[:24]}.safetensors"

    def load_(self, plan: Plan, settings: str, params: list[nn.Parameter]) -> bool:
        """Copy the θ kept for `plan` into `params`; return False when none is kept."""
        path = self._path(plan, settings)
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as kept, torch.no_grad():
            for i, param in enumerate(params):
                param.copy_(kept.get_tensor(f"theta.{i}"))
        return True

    def save(self, plan: Plan, settings: str, params: list[nn.Parameter]) -> None:
        """Keep θ as it is now for `plan`, unless the disk cannot spare it (then it is
        corrected again when asked for)."""
        needed = sum(p.numel() * p.element_size() for p in params)
        self.folder.mkdir(parents=True, exist_ok=True)
        free = free_disk_bytes(self.folder)
        if free is not None and free - needed < self.reserve_bytes:
            self.log("target: θ as corrected not kept for this budget (the disk is short); "
                     "it is corrected again if the search needs it")
            return
        path = self._path(plan, settings)
        partial = path.with_name(path.name + ".partial")
        try:
            save_file({f"theta.{i}": p.detach().contiguous() for i, p in enumerate(params)},
                      str(partial))
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            self.log(f"target: θ as corrected not kept for this budget ({exc})")
