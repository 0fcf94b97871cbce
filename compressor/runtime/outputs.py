"""Run a program on a batch of named inputs and compare its outputs with a reference's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils._pytree import MappingKey, tree_flatten, tree_flatten_with_path


def call_arguments(callee: ExportedProgram | nn.Module, batch: dict[str, torch.Tensor],
                   ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Split named inputs into the (args, kwargs) a program (or its module) was exported to take.

    A program names its user inputs in its graph signature; the inputs of
    `ExportedProgram.module()` are its placeholders. Either way they come in the flattened order
    of the (args, kwargs) it was exported with, which its input spec records.
    """
    if isinstance(callee, ExportedProgram):
        names = list(callee.graph_signature.user_inputs)
        spec = callee.call_spec.in_spec
    else:
        names = [n.target for n in callee.graph.nodes if n.op == "placeholder"]
        spec = getattr(callee, "_in_spec", None)
    if spec is None:
        return (), dict(batch)
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


def output_names(count: int) -> list[str]:
    """Return the ONNX names of a model's outputs: output_0, output_1, ..."""
    return [f"output_{i}" for i in range(count)]


def onnx_output_names(raw_outputs: object) -> list[str]:
    """Return the ONNX names of a module's raw outputs: a dict's keys, else `output_names`."""
    leaves, _ = tree_flatten_with_path(raw_outputs)
    paths = [path for path, leaf in leaves if isinstance(leaf, torch.Tensor)]
    keys = [path[0].key if len(path) == 1 and isinstance(path[0], MappingKey) else None
            for path in paths]
    if all(isinstance(k, str) and k for k in keys) and len(set(keys)) == len(keys):
        return keys
    return output_names(len(paths))


# Output vectors converted to float64 at a time when fidelity is scored.
_VECTORS_PER_CHUNK = 4096


@dataclass
class OutputFidelity:
    """How close one output of a model is to the reference model's, over a data set.

    `cosine` is per sample (per position for outputs of 3+ dimensions), averaged; top-1
    agreement, likewise per sample or position, is given for logits only, where it means
    something.
    """

    kind: str
    cosine: float
    relative_l2: float
    top1_agreement: float | None


class FidelityMeter:
    """Accumulate, batch by batch, how close outputs are to the reference outputs.

    `kinds` holds each output's kind (see `compressor.runtime.objectives`). An output is seen as vectors
    along its last dimension (a sequence of logits: one vector per position); cosine and top-1
    agreement are averaged over those vectors. Sums run in float64 over `_VECTORS_PER_CHUNK`
    vectors at a time, so a decoder's logits are never copied whole.
    """

    def __init__(self, kinds: list[str]) -> None:
        self._kinds = list(kinds)
        n = len(kinds)
        self._err, self._ref, self._cos, self._agree = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
        self._vectors = [0] * n
        self._logits = [kind == "logits" for kind in kinds]

    def add(self, outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
        """Add one batch of outputs and their reference outputs."""
        for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
            width = out.shape[-1] if out.dim() >= 2 else 1
            flat_out = out.detach().reshape(-1, width)
            flat_ref = ref.detach().reshape(-1, width)
            for start in range(0, flat_ref.shape[0], _VECTORS_PER_CHUNK):
                self._add_vectors(i, flat_out[start:start + _VECTORS_PER_CHUNK],
                                  flat_ref[start:start + _VECTORS_PER_CHUNK])

    def _add_vectors(self, i: int, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = out.double(), ref.double()
        self._err[i] += float((out - ref).pow(2).sum())
        self._ref[i] += float(ref.pow(2).sum())
        self._cos[i] += float(torch.nn.functional.cosine_similarity(
            out, ref, dim=1, eps=1e-12).sum())
        self._vectors[i] += ref.shape[0]
        if self._logits[i]:
            self._agree[i] += int((out.argmax(-1) == ref.argmax(-1)).sum())

    def result(self) -> list[OutputFidelity]:
        """Return the fidelity of every output."""
        return [
            OutputFidelity(
                kind=self._kinds[i],
                cosine=self._cos[i] / max(1, self._vectors[i]),
                relative_l2=(self._err[i] / max(self._ref[i], 1e-30)) ** 0.5,
                top1_agreement=(self._agree[i] / max(1, self._vectors[i])
                                if self._logits[i] else None),
            )
            for i in range(len(self._err))
        ]
