"""θ as initialized and corrected sequentially, kept for a retried job.

The sequential correction runs the original and the student over samples, layer by layer: on a
large model it is minutes. The rewriting stage keeps θ once it is corrected, and a retry that
finds it copies it into its freshly parametrized student instead of correcting again. A
`compressor.runtime.resume` product: keyed by the job's inputs, the plan, the gradient
reduction and the correction's samples; discarded (logged) unless everything checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn

from compressor.plan.planning import Plan
from compressor.runtime.resume import (
    ResumeFolder,
    UntrustedProduct,
    fitting,
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
