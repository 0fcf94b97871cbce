"""Run a program on a batch of named inputs and compare its outputs with a reference's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def call_arguments(module: nn.Module, batch: dict[str, torch.Tensor],
                   ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Split named inputs into the (args, kwargs) the program's module was exported to take.

    The inputs of `ExportedProgram.module()` are its placeholders, in the flattened order of the
    (args, kwargs) it was exported with, which its `_in_spec` records.
    """
    spec = getattr(module, "_in_spec", None)
    if spec is None:
        return (), dict(batch)
    names = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    positional = spec.child(0).num_children
    keys = spec.child(1).context
    args = tuple(batch[name] for name in names[:positional])
    return args, {key: batch[name] for key, name in zip(keys, names[positional:], strict=True)}


def call(module: nn.Module, batch: dict[str, torch.Tensor]):
    """Run `module` on a batch of named inputs, whichever way it takes them."""
    args, kwargs = call_arguments(module, batch)
    return module(*args, **kwargs)


def run_outputs(module: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Return the module's outputs on `batch`, flattened to a list of tensors."""
    leaves, _ = tree_flatten(call(module, batch))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def looks_like_logits(output: torch.Tensor) -> bool:
    """Whether an output is (batch, classes) floats, so top-1 agreement means something."""
    return output.is_floating_point() and output.dim() == 2 and output.shape[1] >= 2


@dataclass
class OutputFidelity:
    """How close one output of a model is to the reference model's, over a data set."""

    cosine: float
    relative_l2: float
    top1_agreement: float | None


class FidelityMeter:
    """Accumulate, batch by batch, how close outputs are to the reference outputs."""

    def __init__(self) -> None:
        self._err = self._ref = self._cos = self._agree = None
        self._rows = 0

    def add(self, outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
        """Add one batch of outputs and their reference outputs."""
        if self._err is None:
            n = len(reference)
            self._err, self._ref, self._cos, self._agree = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
            self._logits = [looks_like_logits(r) for r in reference]
        rows = reference[0].shape[0]
        for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
            out, ref = out.detach().double(), ref.detach().double()
            self._err[i] += float((out - ref).pow(2).sum())
            self._ref[i] += float(ref.pow(2).sum())
            flat_out, flat_ref = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
            self._cos[i] += float(torch.nn.functional.cosine_similarity(
                flat_out, flat_ref, dim=1, eps=1e-12).sum())
            if self._logits[i]:
                self._agree[i] += int((out.argmax(1) == ref.argmax(1)).sum())
        self._rows += rows

    def result(self) -> list[OutputFidelity]:
        """Return the fidelity of every output."""
        return [
            OutputFidelity(
                cosine=self._cos[i] / self._rows,
                relative_l2=(self._err[i] / max(self._ref[i], 1e-30)) ** 0.5,
                top1_agreement=self._agree[i] / self._rows if self._logits[i] else None,
            )
            for i in range(len(self._err))
        ]

