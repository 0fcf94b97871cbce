"""The contract every registered method keeps, on every layer kind it applies to.

A new method is tested by being registered: this module runs the same checks over
`available_methods()`, so nothing here names a method.
- round trip: a weight the method can represent exactly (f(θ) of some θ) comes back exactly;
- gradients reach θ, and only θ;
- the materialized (dense) and the factorized (compact) forms compute what the parametrized
  model computes;
- their ONNX exports compute what PyTorch computes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim
from transformers.pytorch_utils import Conv1D

from compressor.config import CompressionConfig
from compressor.export.onnx import export_onnx
from compressor.export.verify import onnx_session, run_onnx
from compressor.load.data import input_specs
from compressor.methods import available_methods, method_class
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.forms import factorize, materialize
from compressor.rewrite.parametrize import parametrize_, theta_of
from compressor.runtime.layers import LAYER_KINDS
from compressor.runtime.outputs import run_outputs


class _Tokens(nn.Module):
    """Embedding → Linear (the target) → Linear head: token ids in, one vector per token out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.hidden = nn.Linear(16, 24)
        self.head = nn.Linear(24, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


class _Gpt2Tokens(nn.Module):
    """Embedding → GPT-2 Conv1D (the target: addmm with an (in, out) weight) → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.hidden = Conv1D(24, 16)
        self.head = nn.Linear(24, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


class _Signal(nn.Module):
    """Conv1d (the target) → pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(signal)).mean(-1))


class _Image(nn.Module):
    """Conv2d (the target) → pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(image)).mean((2, 3)))


# The layer each kind's check targets, in a model where it does not produce an output.
_TARGETS = {"linear": (_Tokens, "hidden"), "embedding": (_Tokens, "embed"),
            "addmm": (_Gpt2Tokens, "hidden"), "conv1d": (_Signal, "conv"),
            "conv2d": (_Image, "conv")}


def _inputs(model: nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, (_Tokens, _Gpt2Tokens)):
        return {"ids": torch.randint(0, 40, (batch, 5), generator=g)}
    if isinstance(model, _Signal):
        return {"signal": torch.randn(batch, 3, 10, generator=g)}
    return {"image": torch.randn(batch, 3, 6, 6, generator=g)}


def _cases() -> list[tuple[str, str]]:
    return [(name, kind) for name in available_methods()
            for kind in sorted(method_class(name).layer_kinds)]


class _Rewritten:
    """A tiny exported model with its one target layer rewritten by the method under test."""

    def __init__(self, method: str, kind: str, tmp_path: Path) -> None:
        model_class, self.target = _TARGETS[kind]
        torch.manual_seed(0)
        model = self.model = model_class().eval()
        self.sample = _inputs(model, 3, seed=1)
        self.program = torch.export.export(
            model, (), kwargs=self.sample,
            dynamic_shapes={n: {0: Dim("batch", min=1, max=1024)} for n in self.sample})
        self.teacher = self.program.module()
        config = CompressionConfig.parse({
            "method": method, "ratio": 0.5, "min_layer_params": 0,
            "layers": {"include": [self.target]}})
        self.plan = plan_layers(*find_layers(self.teacher), config)
        assert [p.layer.name for p in self.plan.compressed] == [self.target]
        self.entry = self.plan.compressed[0]
        self.student = copy.deepcopy(self.teacher)
        parametrize_(self.student, self.plan, {})
        self.tmp_path = tmp_path


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_a_weight_the_method_represents_comes_back_exactly(method, kind, tmp_path):
    rewritten = _Rewritten(method, kind, tmp_path)
    entry = rewritten.entry
    stored = rewritten.student.get_submodule(entry.layer.name).weight.detach().clone()
    assert tuple(stored.shape) == entry.layer.stored_shape  # the layout the op reads
    representable = entry.layer.spec.weight_of(stored)  # W, (out, in, ...)
    assert tuple(representable.shape) == entry.layer.weight_shape
    again = entry.method.parametrization(entry.layer, representable, entry.size, None)
    theta = again.right_inverse(representable)
    theta = theta if isinstance(theta, tuple) else (theta,)
    torch.testing.assert_close(again(*theta), representable, rtol=1e-5, atol=1e-5)
    # Registered on the stored tensor, the same θ gives the stored layout back.
    on_stored = entry.layer.spec.stored_parametrization(again)
    theta = on_stored.right_inverse(stored)
    theta = theta if isinstance(theta, tuple) else (theta,)
    torch.testing.assert_close(on_stored(*theta), stored, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_gradients_reach_theta_and_nothing_else(method, kind, tmp_path):
    rewritten = _Rewritten(method, kind, tmp_path)
    student = rewritten.student
    student.train()
    outputs = run_outputs(student, rewritten.sample)
    sum(o.float().square().sum() for o in outputs).backward()
    theta = theta_of(student, rewritten.target)
    assert theta and all(t.grad is not None and torch.isfinite(t.grad).all() for t in theta)
    assert all(float(t.grad.abs().sum()) > 0 for t in theta)
    theta_ids = {id(t) for t in theta}
    assert all(p.grad is None for p in student.parameters() if id(p) not in theta_ids)


@pytest.mark.parametrize(("method", "kind"), _cases())
def test_dense_and_compact_forms_and_their_onnx_compute_the_parametrized_model(
        method, kind, tmp_path):
    rewritten = _Rewritten(method, kind, tmp_path)
    held_out = _inputs(rewritten.model, 4, seed=2)
    with torch.no_grad():
        expected = run_outputs(rewritten.student, held_out)
        forms = {"dense": materialize(rewritten.student, rewritten.teacher, rewritten.plan),
                 "factorized": factorize(rewritten.student, rewritten.teacher, rewritten.plan)}
    specs = input_specs(rewritten.program)
    for form, module in forms.items():
        with torch.no_grad():
            for got, want in zip(run_outputs(module, held_out), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=form)
        path = tmp_path / f"{form}.onnx"
        export_onnx(module, rewritten.sample, specs, path, opset=18)
        onnx = run_onnx(onnx_session(path), held_out)
        for got, want in zip(onnx, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4,
                                       msg=f"{form} ONNX")


def test_every_method_declares_its_options_and_contract():
    for name in available_methods():
        cls = method_class(name)
        assert cls.Options().name == name
        assert cls.layer_kinds <= set(LAYER_KINDS)
        assert cls.size_field is None or cls.size_field in cls.Options.model_fields
