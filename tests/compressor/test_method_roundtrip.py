"""Every registered method at full size: W round-trips exactly; the compact module is the layer.

For each method of `available_methods()` and each layer kind it applies to, a weight W the
method can represent at its full size is built (a random W for a rank, distinct rows for row
groups, a few distinct values for a codebook, equal rows times a scale for a fixed size), then:
- `forward(*right_inverse(W))` gives back W, with or without calibration statistics;
- the compact module computes what the dense op (F.linear / torch.addmm / F.conv1d /
  F.conv2d / F.embedding, written here, not the kind registry's) computes with W and the bias,
  on random inputs. W is (out, in, ...) for every kind; GPT-2's Conv1D (addmm) multiplies by
  its transpose, the (in, out) tensor its module stores.
Every boolean option of a method is tried both ways. Nothing is skipped: a method whose size
field has no construction below fails until one is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.nn import functional as F

from compressor.methods import LayerInfo, LayerStats, Method, available_methods, method_class

# -- layers ---------------------------------------------------------------------------------------

# Every layer kind, in shapes that are tall and wide, with conv facts that are not the defaults.
LAYERS = {
    "linear": [LayerInfo("tall", "linear", (9, 5), True),
               LayerInfo("wide", "linear", (4, 11), False)],
    "addmm": [LayerInfo("tall_gpt2", "addmm", (9, 5), True),
              LayerInfo("wide_gpt2", "addmm", (4, 11), True)],
    "conv1d": [LayerInfo("conv1d", "conv1d", (6, 3, 3), True, stride=(2,), padding=(1,),
                         dilation=(2,)),
               LayerInfo("pointwise_tall_1d", "conv1d", (13, 2, 1), False, stride=(1,),
                         padding=(1,), dilation=(1,))],
    "conv2d": [LayerInfo("conv", "conv2d", (6, 3, 3, 2), True, stride=(2, 1), padding=(1, 0),
                         dilation=(1, 2)),
               LayerInfo("pointwise_tall", "conv2d", (13, 2, 1, 2), False, padding=(0, 1))],
    "embedding": [LayerInfo("table", "embedding", (20, 8), False),
                  LayerInfo("short_table", "embedding", (5, 12), False)],
}


def _dense(layer: LayerInfo, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """What the original layer computes with `weight` (torch's own ops, not the kind registry)."""
    if layer.kind == "linear":
        return F.linear(x, weight, bias)
    if layer.kind == "addmm":  # GPT-2's Conv1D: x @ (the stored (in, out) tensor) + bias
        stored = weight.T.contiguous()
        return x @ stored + bias if bias is not None else x @ stored
    if layer.kind == "conv1d":
        return F.conv1d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    if layer.kind == "conv2d":
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation)
    assert layer.kind == "embedding"
    return F.embedding(x, weight)


def _inputs(layer: LayerInfo, g: torch.Generator) -> torch.Tensor:
    if layer.kind == "linear":
        return torch.randn(3, 2, layer.in_features, generator=g)
    if layer.kind == "addmm":  # the op's input: token rows
        return torch.randn(6, layer.in_features, generator=g)
    if layer.kind == "conv1d":
        return torch.randn(2, layer.weight_shape[1], 9, generator=g)
    if layer.kind == "conv2d":
        return torch.randn(2, layer.weight_shape[1], 7, 6, generator=g)
    # every row read at least once, some many times
    ids = torch.randint(0, layer.out_features, (4, 9), generator=g)
    ids.view(-1)[: layer.out_features] = torch.arange(layer.out_features)
    return ids


# -- weights each method represents exactly at full size -----------------------------------------


def _rank(layer: LayerInfo, method: Method, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """W = A @ B: any W, at rank min(out, in)."""
    weight = torch.randn(layer.weight_shape, generator=g)
    return weight, min(layer.out_features, layer.in_features)


def _groups(layer: LayerInfo, method: Method, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Output rows tied into groups: W with distinct rows, one group per row."""
    weight = torch.randn(layer.weight_shape, generator=g)
    rows = weight.reshape(layer.out_features, -1)
    assert len(torch.unique(rows, dim=0)) == layer.out_features
    return weight, layer.out_features


def _values(layer: LayerInfo, method: Method, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Every weight one of K values: W built from a few distinct values, K of them."""
    codebook = torch.tensor([-1.75, -0.5, 0.0, 0.3125, 1.25, 2.5])
    idx = torch.randint(0, len(codebook), (layer.numel,), generator=g)
    idx[: len(codebook)] = torch.arange(len(codebook))  # each value is used
    weight = codebook[idx[torch.randperm(layer.numel, generator=g)]].reshape(layer.weight_shape)
    return weight, len(torch.unique(weight))


def _fixed(layer: LayerInfo, method: Method, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """One stored row for every output: W's rows all equal, each times its own positive scale
    when the method learns one per output."""
    row = torch.randn(layer.in_features, generator=g)
    scaled = getattr(method.options, "per_output_scale", False)
    scale = (torch.rand(layer.out_features, generator=g) + 0.5 if scaled
             else torch.ones(layer.out_features))
    weight = (scale[:, None] * row).reshape(layer.weight_shape)
    return weight, method.min_size


# By the method's size field: what a full-size representable W looks like, and that size.
REPRESENTABLE: dict[str | None, Callable[..., tuple[torch.Tensor, int]]] = {
    "rank": _rank, "groups": _groups, "values": _values, None: _fixed,
}


# -- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: str
    options: tuple[tuple[str, object], ...]  # besides the defaults
    layer: LayerInfo

    def __str__(self) -> str:
        options = "".join(f"-{k}={v}" for k, v in self.options)
        return f"{self.method}{options}-{self.layer.kind}-{self.layer.name}"

    def build(self) -> Method:
        cls = method_class(self.method)
        return cls(cls.Options(**dict(self.options)))


def _cases() -> list[Case]:
    cases = []
    for name in available_methods():
        # The defaults, and each boolean option flipped.
        defaults = method_class(name).Options()
        variants = [()] + [((field, not value),) for field, value in defaults.model_dump().items()
                           if isinstance(value, bool)]
        for kind in sorted(method_class(name).layer_kinds):
            cases += [Case(name, options, layer) for options in variants for layer in LAYERS[kind]]
    return cases


CASES = _cases()


def test_every_registered_method_and_kind_has_cases():
    covered = {(case.method, case.layer.kind) for case in CASES}
    assert covered == {(name, kind) for name in available_methods()
                       for kind in method_class(name).layer_kinds}
    assert {method_class(name).size_field for name in available_methods()} <= set(REPRESENTABLE), (
        "a method's size field has no full-size construction here: add one to REPRESENTABLE")


def _stats(layer: LayerInfo, g: torch.Generator) -> LayerStats:
    """Calibration statistics of random inputs with uneven scales (row read counts for a table)."""
    if layer.kind == "embedding":
        counts = torch.bincount(_inputs(layer, g).reshape(-1), minlength=layer.out_features)
        return LayerStats(None, int(counts.sum()), counts.double())
    scales = torch.linspace(0.1, 3.0, layer.in_features, dtype=torch.float64)
    rows = torch.randn(64, layer.in_features, generator=g, dtype=torch.float64) * scales
    return LayerStats(rows.T @ rows, 64)


def _full_size(case: Case, seed: int = 0, with_stats: bool = False):
    method = case.build()
    g = torch.Generator().manual_seed(seed)
    weight, size = REPRESENTABLE[method.size_field](case.layer, method, g)
    stats = _stats(case.layer, g) if with_stats else None
    parametrization = method.parametrization(case.layer, weight, size, stats)
    theta = parametrization.right_inverse(weight)
    theta = theta if isinstance(theta, tuple) else (theta,)
    return method, weight, parametrization, theta, g


@pytest.mark.parametrize("with_stats", [False, True], ids=["no-stats", "stats"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_full_size_forward_of_right_inverse_gives_w_back(case, with_stats):
    # Whatever the calibration statistics weigh, a full-size θ loses nothing.
    _, weight, parametrization, theta, _ = _full_size(case, with_stats=with_stats)
    assert all(t.dtype == weight.dtype for t in theta)
    got = parametrization(*theta)
    assert got.shape == weight.shape
    torch.testing.assert_close(got, weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_compact_module_computes_the_dense_layer(case):
    method, weight, parametrization, theta, g = _full_size(case)
    layer = case.layer
    bias = torch.randn(layer.out_features, generator=g) if layer.has_bias else None
    compact = method.compact_module(layer, parametrization, theta, bias)
    x = _inputs(layer, g)
    with torch.no_grad():
        got = compact(x)
        want = _dense(layer, x, weight, bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
