"""Calibration's per-layer products (lowrank's decompositions) kept for a retried job.

Each layer's product is written to the job's `resume/calibration/` as soon as its method has
prepared it (`Method.prepare`), so a job interrupted in calibration keeps the layers done; a
retry takes a layer's product from there instead of preparing it again (the calibration pass
over the samples still runs: the layers not kept need their statistics). A product is a
`compressor.runtime.resume` product: keyed by the job's inputs, the layer, its method and
planned size, and the calibration's samples and batch size; anything that does not check is
discarded and prepared again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from safetensors import safe_open

from compressor.methods.base import Approximation
from compressor.plan.planning import LayerPlan
from compressor.runtime.resume import ResumeFolder, UntrustedProduct, read_product, write_product

_FOLDER = "calibration"


class KeptPreparations:
    """The prepared products of one job's calibration, kept layer by layer.

    `calibration` names how the statistics were gathered (samples, batch size): a product is
    used only by a calibration that gathers them the same way.
    """

    def __init__(self, resume: ResumeFolder, calibration: str,
                 log: Callable[[str], None]) -> None:
        self.resume = resume
        self.calibration = calibration
        self.log = log
        self.reused: list[str] = []
        self.enabled = True  # off once a write fails (a full disk): the job goes on

    def _where(self, entry: LayerPlan) -> tuple:
        name = entry.layer.name
        folder = self.resume.product(_FOLDER) / hashlib.sha256(name.encode()).hexdigest()[:16]
        key = self.resume.key(_FOLDER, name, entry.method.options.model_dump_json(),
                              str(entry.size), self.calibration)
        return folder, key

    def load(self, entry: LayerPlan, weight: torch.Tensor) -> Approximation | None:
        """Return the layer's kept product, or None (none kept, or discarded: logged)."""
        folder, key = self._where(entry)
        try:
            found = read_product(folder, key)
            if found is None:
                return None
            with safe_open(str(found[0]), framework="pt") as kept:
                tensors = {name: kept.get_tensor(name) for name in kept.keys()}
            product = entry.method.from_kept_tensors(entry.layer, weight, tensors)
        except (UntrustedProduct, ValueError, KeyError) as exc:
            self.log(f"calibration: the kept product of layer {entry.layer.name!r} discarded: "
                     f"{exc}; it is prepared again")
            self.resume.delete_product(folder)
            return None
        self.reused.append(entry.layer.name)
        return product

    def save(self, entry: LayerPlan, product: Approximation) -> None:
        """Keep the layer's product (when its method keeps one)."""
        tensors = entry.method.kept_tensors(product) if self.enabled else None
        if tensors is None:
            return
        folder, key = self._where(entry)
        try:
            write_product(folder, key, tensors, {"layer": entry.layer.name},
                          self.resume.reserve_bytes)
        except OSError as exc:
            self.enabled = False
            self.log(f"calibration: products no longer kept ({exc}); a retry prepares the "
                     "layers not kept again")
