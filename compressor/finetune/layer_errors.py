"""How far each trained layer is from the original's: its weight, and its outputs on real inputs."""

from __future__ import annotations

import torch
from torch import fx, nn

from compressor.plan.layers import run_recording
from compressor.plan.planning import Plan
from compressor.runtime.layers import add_product_, layer_weight

# Rows of a weight taken to float64 at a time.
_ROWS_PER_CHUNK = 4096


def layer_errors(original: fx.GraphModule, compressed: nn.Module, plan: Plan,
                 batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Return each compressed layer's relative weight error and relative output error.

    The output error is measured on the inputs the ORIGINAL model feeds that layer on `batch`:
    ‖X (W' − W)ᵀ‖ / ‖X Wᵀ‖, computed from the Gram matrix G = XᵀX, a chunk of W's rows at a
    time (no output rows are formed: a decoder's output layer would need two float64 copies of
    its logits, and its W alone is 200 MB in float64).
    """
    layers = [entry.layer for entry in plan.compressed]
    errors: dict[str, dict[str, float]] = {}

    def record(layer, x: torch.Tensor) -> None:
        dense = layer_weight(original, layer).detach()
        approx = layer_weight(compressed, layer).detach()
        dense, approx = dense.reshape(dense.shape[0], -1), approx.reshape(dense.shape[0], -1)
        if layer.spec.reads_rows:  # each row weighs as often as the batch reads it
            reads = torch.bincount(x.reshape(-1).to(torch.int64), minlength=dense.shape[0])
            weight = reads.double()[:, None]
            gram = None
        else:
            rows = layer.spec.input_rows(layer, x)
            gram = add_product_(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64),
                                rows, rows)
        sums = torch.zeros(2, dtype=torch.float64)  # ‖W' − W‖², ‖W‖²
        outputs = torch.zeros(2, dtype=torch.float64)  # ‖X (W' − W)ᵀ‖², ‖X Wᵀ‖²
        for start in range(0, dense.shape[0], _ROWS_PER_CHUNK):  # float64 a chunk at a time
            w = dense[start:start + _ROWS_PER_CHUNK].double()
            difference = approx[start:start + _ROWS_PER_CHUNK].double() - w
            sums[0] += difference.pow(2).sum()
            sums[1] += w.pow(2).sum()
            if gram is None:
                rows_read = weight[start:start + _ROWS_PER_CHUNK]
                outputs[0] += (difference.pow(2) * rows_read).sum()
                outputs[1] += (w.pow(2) * rows_read).sum()
            else:
                outputs[0] += ((difference @ gram) * difference).sum()
                outputs[1] += ((w @ gram) * w).sum()
        errors[layer.name] = {
            "relative_weight_error": float(sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30)),
            "relative_output_error": float(outputs[0].clamp(min=0).sqrt()
                                           / outputs[1].sqrt().clamp(min=1e-30)),
        }

    with torch.no_grad():
        run_recording(original, layers, batch, record)
    return errors
