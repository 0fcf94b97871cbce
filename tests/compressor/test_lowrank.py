"""lowrank: W = A @ B as a parametrization, its initializations and its compact form."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compressor.methods import LayerInfo, LayerStats, MethodSettings, get_method

LOWRANK = get_method("lowrank")
SETTINGS = MethodSettings()


def linear_info(layer: nn.Linear) -> LayerInfo:
    return LayerInfo("layer", "linear", tuple(layer.weight.shape), layer.bias is not None)


def conv_info(layer: nn.Conv2d) -> LayerInfo:
    return LayerInfo("layer", "conv2d", tuple(layer.weight.shape), layer.bias is not None,
                     stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


def parametrized_linear(out_features=12, in_features=10, rank=3, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    info = linear_info(layer)
    dense = layer.weight
    parametrize.register_parametrization(
        layer, "weight", LOWRANK.parametrization(info, layer.weight, rank, None, SETTINGS))
    object.__setattr__(layer, "dense_before", dense)  # not a parameter: for the grad check
    return layer, info


def test_forward_is_a_times_b():
    layer, _ = parametrized_linear()
    A, B = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert A.shape == (12, 3) and B.shape == (3, 10)
    x = torch.randn(5, 10)
    torch.testing.assert_close(layer(x), x @ (A @ B).T + layer.bias, rtol=0, atol=1e-6)


def test_gradients_reach_a_and_b_and_not_the_original_weight():
    layer, _ = parametrized_linear()
    layer(torch.randn(4, 10)).pow(2).sum().backward()
    plist = layer.parametrizations.weight
    assert plist.original0.grad is not None and plist.original0.grad.abs().sum() > 0
    assert plist.original1.grad is not None and plist.original1.grad.abs().sum() > 0
    assert layer.dense_before.grad is None
    # The dense weight is no longer a parameter: only A, B and the bias are.
    assert {n for n, _ in layer.named_parameters()} == {
        "bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}


def test_full_rank_right_inverse_reproduces_the_weight():
    torch.manual_seed(1)
    weight = torch.randn(7, 5)
    info = LayerInfo("layer", "linear", (7, 5), False)
    param = LOWRANK.parametrization(info, weight, 5, None, SETTINGS)
    torch.testing.assert_close(param(*param.right_inverse(weight)), weight, rtol=0, atol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(2)
    weight = torch.randn(20, 16)
    info = LayerInfo("layer", "linear", (20, 16), False)
    param = LOWRANK.parametrization(info, weight, 4, None, SETTINGS)
    error = torch.linalg.matrix_norm(param(*param.right_inverse(weight)) - weight)
    singular = torch.linalg.svdvals(weight)
    torch.testing.assert_close(error, singular[4:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_activation_aware_beats_plain_svd_on_real_activations():
    digits = torch.tensor(load_digits().data, dtype=torch.float64) / 16.0  # real, anisotropic
    torch.manual_seed(3)
    weight = torch.randn(48, 64, dtype=torch.float64)
    info = LayerInfo("layer", "linear", (48, 64), False)
    calibration, held_out = digits[:1200], digits[1200:]
    stats = LayerStats(calibration.T @ calibration, calibration.shape[0])
    errors = {}
    for name, layer_stats in (("svd", None), ("activation_aware", stats)):
        param = LOWRANK.parametrization(info, weight, 8, layer_stats, SETTINGS)
        approx = param(*param.right_inverse(weight))
        errors[name] = float(torch.linalg.matrix_norm(held_out @ (approx - weight).T)
                             / torch.linalg.matrix_norm(held_out @ weight.T))
    assert errors["activation_aware"] < 0.5 * errors["svd"], errors


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_compact_linear_equals_the_parametrized_layer(rank):
    layer, info = parametrized_linear(rank=rank)
    theta = (layer.parametrizations.weight.original0, layer.parametrizations.weight.original1)
    compact = LOWRANK.compact_module(info, layer.parametrizations.weight[0], theta, layer.bias)
    x = torch.randn(2, 6, 10)
    torch.testing.assert_close(compact(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_factorizes_into_kxk_then_1x1(stride, padding, dilation):
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation)
    info = conv_info(conv)
    conv.weight.requires_grad_(False)
    parametrize.register_parametrization(
        conv, "weight", LOWRANK.parametrization(info, conv.weight, 4, None, SETTINGS))
    plist = conv.parametrizations.weight
    compact = LOWRANK.compact_module(info, plist[0], (plist.original0, plist.original1), conv.bias)
    assert compact.spatial.shape == (4, 6, 3, 3) and compact.pointwise.shape == (10, 4, 1, 1)
    x = torch.randn(2, 6, 11, 11)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(compact(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,budget,expected",
    [
        ((64, 32), 0.5 * 64 * 32, 10),   # floor(1024 / 96)
        ((64, 32), 96.0, 1),
        ((64, 32), 95.0, None),          # not even rank 1 fits
        ((4, 4), 16.0, None),            # rank 2 costs 16 = dense: saves nothing
        ((100, 10), 1000.0, 9),          # rank 9 costs 990 < 1000 dense weights
    ],
)
def test_size_for_budget(shape, budget, expected):
    info = LayerInfo("layer", "linear", shape, False)
    assert LOWRANK.size_for_budget(info, budget, SETTINGS) == expected
    if expected is not None:
        assert LOWRANK.compact_numel(info, expected, SETTINGS) <= budget
