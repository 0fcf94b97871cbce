"""The tying methods (tie_inputs, tie_rows, share_values): one table of cases over tiny layers.

Pinned: the tying structure holds exactly (before and after an AdamW step); a shared parameter's
gradient is the sum (or mean) of its copies' gradients; right_inverse gives the group means and
round-trips exactly at full size; the compact module equals the parametrized layer and exports
to ONNX (onnxruntime ≈ torch) in a file smaller than the dense weight; the size arithmetic.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.export import Dim
from torch.nn import functional as F

from compressor.config import CompressionConfig
from compressor.errors import ConfigError, ExportError
from compressor.export.onnx import export_onnx, onnx_bytes
from compressor.export.verify import onnx_session, run_onnx
from compressor.load.data import input_specs
from compressor.methods import LayerInfo, LayerStats, Method, get_method
from compressor.methods._tying import kmeans_rows, kmeans_values
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.forms import factorize
from compressor.rewrite.parametrize import parametrize_
from compressor.runtime.graph import shallow_copy


@dataclass(frozen=True)
class Case:
    method: str
    kind: str
    size: int
    scaled: bool = False  # tie_inputs: per_output_scale

    def __str__(self) -> str:
        return f"{self.method}-{self.kind}-{self.size}{'-scaled' if self.scaled else ''}"


CASES = [
    Case("tie_inputs", "linear", 1),
    Case("tie_inputs", "linear", 1, scaled=True),
    Case("tie_rows", "linear", 4),
    Case("tie_rows", "conv2d", 3),
    Case("share_values", "linear", 8),
    Case("share_values", "conv2d", 300),  # > 256 values (of 576 weights): uint16 indices
]
REDUCTIONS = ["sum", "mean"]


def _layer(kind: str, *, big: bool = False, seed: int = 0) -> tuple[nn.Module, LayerInfo]:
    """Return a tiny layer (or, `big`, one with more than 8192 weights) and its LayerInfo."""
    torch.manual_seed(seed)
    if kind == "linear":
        module = nn.Linear(160, 64) if big else nn.Linear(16, 12)
        return module, LayerInfo("fc", "linear", tuple(module.weight.shape), True)
    module = nn.Conv2d(32 if big else 8, 32 if big else 8, 3, stride=2, padding=1)
    info = LayerInfo("conv", "conv2d", tuple(module.weight.shape), True,
                     stride=module.stride, padding=module.padding, dilation=module.dilation)
    return module, info


def _input(kind: str, module: nn.Module, batch: int = 3) -> torch.Tensor:
    if kind == "linear":
        return torch.randn(batch, module.in_features)
    return torch.randn(batch, module.in_channels, 9, 9)


def _method(name: str, scaled: bool = False) -> Method:
    """The method `name` configured with its defaults (tie_inputs: `per_output_scale=scaled`)."""
    return get_method(name, per_output_scale=scaled) if name == "tie_inputs" else get_method(name)


def _parametrize(case: Case, reduction: str = "sum", *, big: bool = False):
    """Return (layer, info, parametrization) with the method registered on layer.weight."""
    module, info = _layer(case.kind, big=big)
    method = _method(case.method, case.scaled)
    par = method.parametrization(info, module.weight, case.size, None, reduction)
    parametrize.register_parametrization(module, "weight", par, unsafe=False)
    return module, info, par


def _theta(module: nn.Module) -> tuple[torch.Tensor, ...]:
    originals = module.parametrizations.weight
    count = sum(1 for name, _ in originals.named_parameters(recurse=False)
                if name.startswith("original"))
    return tuple(getattr(originals, f"original{i}") for i in range(count))


def _expected_weight(case: Case, par: nn.Module, theta: tuple[torch.Tensor, ...],
                     shape: torch.Size) -> torch.Tensor:
    """Build W from θ and the structure by hand (advanced indexing, not the method's code)."""
    if case.method == "tie_inputs":
        row = theta[0]
        rows = torch.stack([row] * shape[0])
        return rows * theta[1][:, None] if case.scaled else rows
    if case.method == "tie_rows":
        return theta[0][par.idx.long()].reshape(shape)
    return theta[0][par.idx.long()]


def _dense_grad(case: Case, module: nn.Module, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Return dL/dW for L = <layer(x), proj>, computed on a plain copy of the layer."""
    weight = module.weight.detach().clone().requires_grad_()
    if case.kind == "linear":
        out = F.linear(x, weight, module.bias)
    else:
        out = F.conv2d(x, weight, module.bias, module.stride, module.padding)
    (out * proj).sum().backward()
    return weight.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_structure_holds_before_and_after_an_adamw_step(case: Case, reduction: str) -> None:
    module, _, par = _parametrize(case, reduction)
    theta = _theta(module)
    assert torch.equal(module.weight, _expected_weight(case, par, theta, module.weight.shape))
    optimizer = torch.optim.AdamW(theta, lr=0.05)
    x = _input(case.kind, module)
    before = [t.detach().clone() for t in theta]
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(b, t) for b, t in zip(before, theta, strict=True))
    weight = module.weight
    assert torch.equal(weight, _expected_weight(case, par, theta, weight.shape))
    if case.method == "tie_rows":
        rows = weight.reshape(weight.shape[0], -1)
        for group in par.idx.long().unique():
            members = rows[par.idx.long() == group]
            assert torch.equal(members, members[:1].expand_as(members))
    if case.method == "share_values":
        assert weight.unique().numel() <= case.size


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_shared_gradient_is_sum_or_mean_of_copies(case: Case, reduction: str) -> None:
    module, _, par = _parametrize(case, reduction)
    x = _input(case.kind, module)
    proj = torch.randn_like(module(x))
    (module(x) * proj).sum().backward()
    copies = _dense_grad(case, module, x, proj)  # the gradient of every copy (entry of W)
    theta = _theta(module)
    mean = reduction == "mean"
    if case.method == "tie_inputs":
        scale = theta[1].detach() if case.scaled else torch.ones(copies.shape[0])
        expected = (copies * scale[:, None]).sum(0)
        torch.testing.assert_close(theta[0].grad, expected / copies.shape[0] if mean else expected)
        if case.scaled:  # a scale is not a copy: never reduced
            torch.testing.assert_close(theta[1].grad, (copies * theta[0].detach()).sum(1))
        return
    # One entry of θ per group: a row of U (tie_rows) or a codebook value (share_values).
    idx = par.idx.long().reshape(-1)
    flat = copies.reshape(copies.shape[0], -1) if case.method == "tie_rows" else copies.reshape(-1)
    expected = torch.zeros_like(theta[0])
    for group in range(theta[0].shape[0]):
        members = flat[idx == group]
        if len(members):
            expected[group] = members.mean(0) if mean else members.sum(0)
    torch.testing.assert_close(theta[0].grad, expected)


def test_tie_inputs_stores_one_row_as_a_stride_zero_view() -> None:
    module, info, _ = _parametrize(Case("tie_inputs", "linear", 1))
    assert 0 in module.weight.stride()
    assert module.weight.data_ptr() == _theta(module)[0].data_ptr()
    for scaled in (False, True):
        stored = sum(t.numel() for t in _theta(_parametrize(Case("tie_inputs", "linear", 1,
                                                                 scaled=scaled))[0]))
        assert stored == info.in_features + (info.out_features if scaled else 0)
        assert _method("tie_inputs", scaled).compact_numel(info, 1) == stored


@pytest.mark.parametrize("case", CASES, ids=str)
def test_right_inverse_returns_group_means(case: Case) -> None:
    module, info = _layer(case.kind)
    weight = module.weight.detach()
    par = _method(case.method, case.scaled).parametrization(info, weight, case.size, None)
    theta = par.right_inverse(weight)
    if case.method == "tie_inputs" and not case.scaled:
        torch.testing.assert_close(theta[0], weight.mean(0))
    elif case.method == "tie_inputs":  # the best rank-1 fit s wᵀ
        U, S, Vh = torch.linalg.svd(weight.double())
        best = (S[0] * U[:, :1] @ Vh[:1]).float()
        torch.testing.assert_close(theta[0] * theta[1][:, None], best)
        assert theta[1].sum() > 0
        torch.testing.assert_close(theta[1].square().sum(), torch.tensor(float(info.out_features)))
    elif case.method == "tie_rows":
        rows = weight.reshape(weight.shape[0], -1)
        for group in range(case.size):
            members = rows[par.idx.long() == group]
            assert len(members) > 0  # k-means leaves no group empty here
            torch.testing.assert_close(theta[0][group], members.mean(0))
    else:
        for value in range(case.size):
            members = weight[par.idx.long() == value]
            if len(members):
                torch.testing.assert_close(theta[0][value], members.mean())


def test_full_size_round_trip_is_exact() -> None:
    torch.manual_seed(1)
    linear = LayerInfo("fc", "linear", (12, 16), True)
    conv = LayerInfo("conv", "conv2d", (6, 4, 3, 3), True)
    # tie_rows with one group per (distinct) row: every row is its own group.
    for info in (linear, conv):
        weight = torch.randn(info.weight_shape)
        par = get_method("tie_rows").parametrization(info, weight, info.out_features, None)
        assert sorted(par.idx.tolist()) == list(range(info.out_features))
        assert torch.equal(par(*par.right_inverse(weight)), weight)
    # share_values when W has at most K distinct values (here 5, K = 5 and K = 8).
    for info, values in ((linear, 5), (conv, 8)):
        weight = torch.randn(5)[torch.randint(5, info.weight_shape)]
        par = get_method("share_values").parametrization(info, weight, values, None)
        assert torch.equal(par(*par.right_inverse(weight)), weight)
    # tie_inputs on identical rows; scaled, on a rank-1 weight.
    rank_one = torch.randn(12, 1).abs() * torch.randn(1, 16)
    for weight, scaled in ((torch.randn(16).expand(12, 16), False), (rank_one, True)):
        par = _method("tie_inputs", scaled).parametrization(linear, weight, 1, None)
        restored = par(*par.right_inverse(weight))
        assert torch.equal(restored, weight) if not scaled else torch.allclose(restored, weight,
                                                                               atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compact_module_matches_the_parametrized_layer(case: Case) -> None:
    module, info, par = _parametrize(case)
    theta = _theta(module)
    with torch.no_grad():  # move θ off its initial value so the check is not trivial
        for t in theta:
            t.add_(0.01 * torch.randn_like(t))
    compact = get_method(case.method).compact_module(info, par, theta, module.bias)
    assert all(not p.requires_grad for p in compact.parameters())
    x = _input(case.kind, module)
    with torch.no_grad():
        if case.kind == "linear":
            expected = F.linear(x, module.weight, module.bias)
        else:
            expected = F.conv2d(x, module.weight, module.bias, module.stride, module.padding)
        torch.testing.assert_close(compact(x), expected, atol=1e-5, rtol=1e-5)
    # θ is final by now: the compact module shares its storage rather than holding a copy.
    assert theta[0].data_ptr() in {p.data_ptr() for p in compact.parameters()}


def _export(module: nn.Module, x: torch.Tensor, folder: Path) -> tuple[Path, int]:
    """Export with a dynamic batch; return the model path and its total bytes on disk."""
    folder.mkdir()
    path = folder / "model.onnx"
    torch.onnx.export(module.eval(), (x,), path, dynamo=True, opset_version=18, verbose=False,
                      dynamic_shapes=({0: Dim("batch")},))
    return path, sum(f.stat().st_size for f in folder.iterdir())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compact_module_exports_to_a_smaller_onnx(case: Case, tmp_path: Path) -> None:
    module, info, par = _parametrize(case, big=True)
    compact = get_method(case.method).compact_module(info, par, _theta(module), module.bias)
    path, size = _export(compact, _input(case.kind, module, batch=3), tmp_path / "compact")
    dense_bytes = info.numel * 4
    assert size < dense_bytes, f"{size} bytes on disk, dense weight {dense_bytes}"
    # No initializer as large as the weight: the exporter did not fold W = f(θ) back in.
    graph = onnx.load(str(path), load_external_data=False).graph
    floats = [math.prod(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(floats) < info.numel
    x = _input(case.kind, module, batch=5)  # another batch size than the export's
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), compact(x), atol=1e-5, rtol=1e-5)



class _SmallNet(nn.Module):
    """Conv2d → pooled Linear → Linear: 648, 2304 and 3840 weights, each below the 8192
    elements up to which onnxscript's constant folding evaluates a node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.hidden = nn.Linear(24, 96)
        self.head = nn.Linear(96, 40)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(image)).mean((2, 3))
        return self.head(torch.relu(self.hidden(pooled)))


def test_share_values_onnx_keeps_small_layers_as_uint8_indices_and_a_codebook(
        tmp_path: Path) -> None:
    """The factorized form of small layers exports as idx (uint8, one byte a weight) and the
    codebook: constant folding does not store W = codebook[idx] as float32, nor the indices
    cast to int32, so the file is far below the float original's."""
    torch.manual_seed(0)
    model = _SmallNet().eval()
    sample = {"image": torch.randn(3, 3, 6, 6)}
    program = torch.export.export(model, (), kwargs=sample,
                                  dynamic_shapes={"image": {0: Dim("batch", min=1, max=64)}})
    teacher = shallow_copy(program.module()).eval()  # as the job loads it
    config = CompressionConfig.parse({"target": None, "min_layer_params": 0,
                                      "method": {"name": "share_values", "values": 256}})
    plan = plan_layers(*find_layers(teacher), config)
    targeted = {p.layer.name: p.layer.numel for p in plan.compressed}
    assert targeted == {"conv": 648, "hidden": 2304, "head": 3840}
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {})
    with torch.no_grad():
        compact = factorize(student, teacher, plan)
    specs = input_specs(program)
    dense_path, compact_path = tmp_path / "dense.onnx", tmp_path / "shared.onnx"
    export_onnx(teacher, sample, specs, dense_path, opset=18)
    export_onnx(compact, sample, specs, compact_path, opset=18)

    graph = onnx.load(str(compact_path)).graph
    by_type: dict[int, list[int]] = {}
    for init in graph.initializer:
        by_type.setdefault(init.data_type, []).append(math.prod(init.dims))
    floats = by_type.get(onnx.TensorProto.FLOAT, [])
    assert not set(floats) & set(targeted.values()), f"a weight was folded to float: {floats}"
    assert max(floats) <= 256  # codebooks and biases only
    assert sum(by_type.get(onnx.TensorProto.UINT8, [])) == sum(targeted.values())
    wide = by_type.get(onnx.TensorProto.INT32, []) + by_type.get(onnx.TensorProto.INT64, [])
    assert max(wide, default=0) <= 8  # shapes, not indices cast to int32 / int64
    dense_bytes, compact_bytes = onnx_bytes(dense_path), onnx_bytes(compact_path)
    assert compact_bytes < 0.6 * dense_bytes, (compact_bytes, dense_bytes)

    held_out = {"image": torch.randn(5, 3, 6, 6)}  # another batch size than the export's
    (got,) = run_onnx(onnx_session(compact_path), held_out)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), student(**held_out),
                                   atol=1e-5, rtol=1e-5)

def test_parametrized_layer_with_mean_reduction_exports(tmp_path: Path) -> None:
    # The mean reduction lives in the autograd graph only: export sees an identity.
    module, _, _ = _parametrize(Case("tie_rows", "linear", 4), "mean")
    path, _ = _export(module, torch.randn(3, 16), tmp_path / "parametrized")
    x = torch.randn(5, 16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(x), atol=1e-5, rtol=1e-5)


LINEAR = LayerInfo("fc", "linear", (12, 16), True)
CONV = LayerInfo("conv", "conv2d", (6, 4, 3, 3), True)
WIDE = LayerInfo("wide", "linear", (1000, 64), True)


@pytest.mark.parametrize(
    ("method", "layer", "scaled", "size", "numel"),
    [
        ("tie_inputs", LINEAR, False, 1, 16.0),
        ("tie_inputs", LINEAR, True, 1, 28.0),
        ("tie_rows", LINEAR, False, 4, 4 * 16 + 12 * 8 / 32),
        ("tie_rows", CONV, False, 1, 36 + 6 * 8 / 32),
        ("tie_rows", WIDE, False, 257, 257 * 64 + 1000 * 16 / 32),
        ("share_values", LINEAR, False, 8, 8 + 192 * 8 / 32),
        ("share_values", CONV, False, 300, 300 + 216 * 16 / 32),
    ],
)
def test_compact_numel(method: str, layer: LayerInfo, scaled: bool, size: int,
                       numel: float) -> None:
    assert _method(method, scaled).compact_numel(layer, size) == pytest.approx(numel)


@pytest.mark.parametrize(
    ("method", "layer", "scaled", "budget", "size"),
    [
        ("tie_inputs", LINEAR, True, 28, 1),
        ("tie_inputs", LINEAR, True, 27.9, None),
        ("tie_inputs", LINEAR, False, 16, 1),
        ("tie_inputs", LayerInfo("one", "linear", (1, 16), True), False, 100, None),  # no saving
        ("tie_rows", LINEAR, False, 67, 4),
        ("tie_rows", LINEAR, False, 66.9, 3),
        ("tie_rows", LINEAR, False, 10_000, 11),  # k = out ties nothing: at most out - 1
        ("tie_rows", LINEAR, False, 10, None),
        ("tie_rows", WIDE, False, 257 * 64 + 500, 257),  # 16-bit indices from 257 groups
        ("tie_rows", WIDE, False, 257 * 64 + 499, 256),
        ("tie_rows", LayerInfo("g", "conv2d", (8, 1, 3, 3), True, groups=8), False, 40, None),
        ("tie_rows", LayerInfo("thin", "linear", (64, 1), True), False, 60, 44),
        ("tie_rows", LayerInfo("thin", "linear", (64, 1), True), False, 100, None),  # >= numel
        ("share_values", LINEAR, False, 56, 8),
        ("share_values", LINEAR, False, 100, 52),
        ("share_values", LINEAR, False, 49.9, None),  # K >= 2
        ("share_values", LINEAR, False, 50, 2),
        ("share_values", LINEAR, False, 10_000, None),  # even 2 values do not beat 192 numbers
        ("share_values", LayerInfo("big", "linear", (1024, 1024), True), False, 0.5 * 2**20,
         256),
        ("share_values", LayerInfo("big", "linear", (1024, 1024), True), False, 0.6 * 2**20,
         65536),
    ],
)
def test_size_for_budget(method: str, layer: LayerInfo, scaled: bool, budget: float,
                         size: int | None) -> None:
    chosen = _method(method, scaled).size_for_budget(layer, budget)
    assert chosen == size
    if chosen is not None:
        numel = _method(method, scaled).compact_numel(layer, chosen)
        assert numel <= budget and numel < layer.numel


@pytest.mark.parametrize(("method", "size"),
                         [("tie_inputs", 2), ("tie_rows", 0), ("tie_rows", 13),
                          ("share_values", 1), ("share_values", 65537)])
def test_sizes_out_of_range_are_config_errors(method: str, size: int) -> None:
    with pytest.raises(ConfigError, match="fc"):
        get_method(method).parametrization(LINEAR, torch.randn(12, 16), size, None)


def test_tie_rows_has_no_factorized_grouped_conv() -> None:
    info = LayerInfo("depthwise", "conv2d", (8, 1, 3, 3), True, groups=8)
    weight = torch.randn(8, 1, 3, 3)
    par = get_method("tie_rows").parametrization(info, weight, 4, None)
    with pytest.raises(ExportError, match="depthwise"):
        get_method("tie_rows").compact_module(info, par, par.right_inverse(weight), None)


def test_index_buffers_are_small_persistent_integers() -> None:
    cases = [(Case("tie_rows", "linear", 4), torch.uint8),
             (Case("share_values", "linear", 8), torch.uint8),
             (Case("share_values", "conv2d", 300), torch.uint16)]
    for case, dtype in cases:
        module, _, par = _parametrize(case)
        assert par.idx.dtype == dtype
        assert "parametrizations.weight.0.idx" in module.state_dict()


def test_tie_rows_uses_the_input_gram_as_its_metric() -> None:
    # Rows differ a little in input 0 and a lot in input 1; input 1 carries no signal.
    weight = torch.tensor([[0.0, 0.0], [0.0, 10.0], [1.0, 0.0], [1.0, 10.0]])
    info = LayerInfo("fc", "linear", (4, 2), False)
    method = get_method("tie_rows")
    plain = method.parametrization(info, weight, 2, None).idx.tolist()
    stats = LayerStats(gram=torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64)), rows=10)
    aware = method.parametrization(info, weight, 2, stats).idx.tolist()
    assert plain[0] == plain[2] and plain[1] == plain[3] and plain[0] != plain[1]
    assert aware[0] == aware[1] and aware[2] == aware[3] and aware[0] != aware[2]


def test_kmeans_is_deterministic_and_uses_every_cluster() -> None:
    torch.manual_seed(2)
    rows = torch.randn(50, 8)
    assert torch.equal(kmeans_rows(rows, 10), kmeans_rows(rows.clone(), 10))
    assert kmeans_rows(rows, 10).unique().numel() == 10
    values = torch.randn(5000) ** 3  # heavy tails: linear init leaves clusters empty at first
    idx = kmeans_values(values, 64)
    assert torch.equal(idx, kmeans_values(values.clone(), 64))
    assert idx.unique().numel() == 64
    # 1-D clusters are contiguous runs of the sorted values, in codebook order.
    maxima = torch.stack([values[idx == j].max() for j in range(64)])
    minima = torch.stack([values[idx == j].min() for j in range(64)])
    assert bool((maxima[:-1] < minima[1:]).all())
