"""How many samples each stage of a job can afford, from one sample's cost; a module's size.

A small model calibrates, corrects and measures on every sample it is given (up to each stage's
own cap). A billion-parameter model cannot: one forward pass over 64 samples of 256 tokens is
36 TFLOP, several minutes on 2 cores, and its activations can outweigh the memory left beside
the weights. So each stage takes as many samples as its compute budget (FLOPs of forward passes)
and its memory budget (live activations, a fraction of the model's own bytes) allow, never fewer
than `MIN_SAMPLES` for compute's sake, never more than memory allows. The job log says what each
stage used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from compressor.runtime.graph import live_bytes
from compressor.runtime.memory import largest_tensor_bytes, tensor_bytes
from compressor.runtime.outputs import call

# Forward-pass FLOPs that calibration (statistics of every layer's inputs) may spend.
CALIBRATION_FLOPS = 2 * 10**13
# Forward-pass FLOPs per model that the sequential correction may spend (it runs two).
SEQUENTIAL_FLOPS = 10**13
# Forward-pass FLOPs the report's per-layer errors may spend.
LAYER_ERROR_FLOPS = 2 * 10**12
# One latency figure's run may cost this many FLOPs; a larger batch is left out of the report.
LATENCY_FLOPS = 4 * 10**12
# Live activations of a stage's batch stay under this fraction of the model's bytes, or this
# many bytes when that is more (a small model's batches need not be tiny).
ACTIVATIONS_PER_MODEL_BYTE = 0.5
MIN_ACTIVATION_BYTES = 256 << 20
# Float copies of the outputs that scoring a batch makes (softmaxes, differences, ...).
EVALUATION_COPIES = 8
# Calibration samples run at a time, at most (its statistics are sums: only memory depends on it).
CALIBRATION_BATCH = 16
# A compute budget never cuts a stage below this many samples.
MIN_SAMPLES = 8
# With a time budget (`max_minutes`), calibration may spend this share of what is left of it
# (beside what export, verification and the report need); one of its samples costs about this
# many forward passes (the pass and the Gram products of the layers' inputs).
CALIBRATION_BUDGET_SHARE = 0.25
CALIBRATION_PASSES = 2


@dataclass(frozen=True)
class SampleCosts:
    """One sample's cost: the FLOPs of a forward pass and its peak live activations."""

    flops_per_sample: int
    activation_bytes_per_sample: int
    model_bytes: int
    output_bytes_per_sample: int = 0
    largest_weight_bytes: int = 0  # the model's largest tensor (what a quantizer copies most)

    @classmethod
    def measure(cls, module: fx.GraphModule, sample: dict[str, torch.Tensor]) -> SampleCosts:
        """Run `module` once on `sample` (one sample), counting FLOPs and live tensors."""
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            live, outputs = live_bytes(module, sample)
        return cls(int(counter.get_total_flops()), live, tensor_bytes(module), outputs,
                   largest_tensor_bytes(module))

    def _affordable(self, wanted: int, flops: int | None, models: int = 1,
                    activation_bytes: int | None = None) -> int:
        by_compute = wanted if flops is None else max(
            MIN_SAMPLES, flops // max(1, self.flops_per_sample))
        per_sample = (self.activation_bytes_per_sample if activation_bytes is None
                      else activation_bytes)
        by_memory = max(1, int(self._memory() // max(1, models * per_sample)))
        return max(1, min(wanted, by_compute, by_memory))

    def calibration_samples(self, wanted: int) -> int:
        """Samples calibration affords (compute), of the `wanted` ones."""
        return max(1, min(wanted, max(MIN_SAMPLES,
                                      CALIBRATION_FLOPS // max(1, self.flops_per_sample))))

    @staticmethod
    def calibration_samples_in(seconds: float, forward_s_per_sample: float, wanted: int) -> int:
        """Samples calibration affords in `seconds` of a time budget, at a forward pass's measured
        `forward_s_per_sample` (`CALIBRATION_BUDGET_SHARE` of them, `CALIBRATION_PASSES` passes
        a sample), of the `wanted` ones; never fewer than `MIN_SAMPLES`."""
        per_sample = CALIBRATION_PASSES * max(forward_s_per_sample, 1e-9)
        affordable = int(CALIBRATION_BUDGET_SHARE * max(0.0, seconds) / per_sample)
        return max(1, min(wanted, max(MIN_SAMPLES, affordable)))

    def calibration_batch(self, samples: int) -> int:
        """Samples calibration runs at a time (memory): all `samples` when they fit (each
        layer is then decomposed as it is reached), else at most `CALIBRATION_BATCH`."""
        affordable = self._affordable(samples, None)
        return affordable if affordable >= samples else min(affordable, CALIBRATION_BATCH)

    def sequential_samples(self, wanted: int, activation_bytes: int | None = None) -> int:
        """Samples the sequential correction affords: both models hold their activations
        (`activation_bytes` per sample, measured up to its last layer, when given: a decoder's
        correction stops before its logits)."""
        return self._affordable(wanted, SEQUENTIAL_FLOPS, models=2,
                                activation_bytes=activation_bytes)

    def layer_error_samples(self, wanted: int) -> int:
        """Held-out samples the report's per-layer errors are measured on (one more pass of
        the original: compute and memory)."""
        return self._affordable(wanted, LAYER_ERROR_FLOPS)

    def evaluation_batch(self, wanted: int) -> int:
        """Samples scored at a time against the original's outputs: the loss of a decoder's
        logits makes several float copies of them (`EVALUATION_COPIES`)."""
        per_sample = self.activation_bytes_per_sample + EVALUATION_COPIES * self.output_bytes_per_sample
        return max(1, min(wanted, int(self._memory() // max(1, per_sample))))

    def latency_batches(self, batches: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Split latency batch sizes into those one run affords (compute and memory) and those
        left out. Batch 1 is always kept."""
        per_sample = self.activation_bytes_per_sample + self.output_bytes_per_sample
        kept = [b for b in batches if b == 1 or (b * self.flops_per_sample <= LATENCY_FLOPS
                                                 and b * per_sample <= self._memory())]
        return kept, [b for b in batches if b not in kept]

    def _memory(self) -> float:
        return max(MIN_ACTIVATION_BYTES, ACTIVATIONS_PER_MODEL_BYTE * self.model_bytes)

    def describe(self) -> str:
        return (f"one sample: {self.flops_per_sample / 1e9:.3g} GFLOP, "
                f"{self.activation_bytes_per_sample / 2**20:.3g} MiB of live activations, "
                f"{self.output_bytes_per_sample / 2**20:.3g} MiB of outputs")


def count_parameters(module: nn.Module) -> int:
    """Return the number of parameter and buffer elements `module` stores."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors)


def count_flops(module: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Return the FLOPs of one forward pass of `module` on `batch`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call(module, batch)
    return int(counter.get_total_flops())
