"""lowrank: W = A @ B as a parametrization, its initializations and its compact form."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compressor.methods import LayerInfo, LayerStats, available_methods, get_method, method_class

LOWRANK = get_method("lowrank")


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
        layer, "weight", LOWRANK.parametrization(info, layer.weight, rank, None))
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
    param = LOWRANK.parametrization(info, weight, 5, None)
    torch.testing.assert_close(param(*param.right_inverse(weight)), weight, rtol=0, atol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(2)
    weight = torch.randn(20, 16)
    info = LayerInfo("layer", "linear", (20, 16), False)
    param = LOWRANK.parametrization(info, weight, 4, None)
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
        param = LOWRANK.parametrization(info, weight, 8, layer_stats)
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
        conv, "weight", LOWRANK.parametrization(info, conv.weight, 4, None))
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
    assert LOWRANK.size_for_budget(info, budget) == expected
    if expected is not None:
        assert LOWRANK.compact_numel(info, expected) <= budget


def test_decomposition_energies_are_the_truncation_errors():
    torch.manual_seed(5)
    weight = torch.randn(20, 16, dtype=torch.float64)
    info = LayerInfo("layer", "linear", (20, 16), False)
    factors = LOWRANK.factorize(info, weight, None)
    for rank in (0, 3, 16):
        approx = factors.first(rank).double() @ factors.second(rank).double()
        assert factors.error(rank) == pytest.approx(float((weight - approx).pow(2).sum()),
                                                    rel=1e-4, abs=1e-6)


def test_activation_aware_energies_are_the_output_errors_on_the_calibration_inputs():
    torch.manual_seed(6)
    x = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    weight = torch.randn(12, 16, dtype=torch.float64)
    info = LayerInfo("layer", "linear", (12, 16), False)
    factors = LOWRANK.factorize(info, weight, LayerStats(x.T @ x, 200))
    approx = factors.first(4).double() @ factors.second(4).double()
    output_error = float((x @ (weight - approx).T).pow(2).sum())
    assert factors.error(4) == pytest.approx(output_error, rel=1e-3)


def test_embedding_rows_read_often_are_kept_better():
    torch.manual_seed(7)
    table = torch.randn(50, 16)
    info = LayerInfo("embed", "embedding", (50, 16), False)
    counts = torch.zeros(50, dtype=torch.float64)
    counts[:10] = 100.0  # ten frequent tokens; the rest never read in calibration
    weighted = LOWRANK.factorize(info, table, LayerStats(None, 1000, row_counts=counts))
    plain = LOWRANK.factorize(info, table, None)

    def frequent_error(factors):
        return float((table[:10] - factors.product(6)[:10]).pow(2).sum())

    assert frequent_error(weighted) < 0.5 * frequent_error(plain)


@pytest.mark.parametrize("method", [name for name in available_methods()
                                    if "embedding" in method_class(name).layer_kinds])
def test_compact_embedding_equals_the_parametrized_table(method):
    torch.manual_seed(8)
    embed = nn.Embedding(40, 12)
    embed.weight.requires_grad_(False)
    info = LayerInfo("embed", "embedding", (40, 12), False)
    chosen = get_method(method)
    size = chosen.size_for_budget(info, info.numel / 2)  # a size that compresses the table
    assert size is not None
    parametrize.register_parametrization(
        embed, "weight", chosen.parametrization(info, embed.weight, size, None))
    plist = embed.parametrizations.weight
    theta = tuple(getattr(plist, f"original{i}") for i in range(2) if hasattr(plist, f"original{i}"))
    theta = theta or (plist.original,)
    compact = chosen.compact_module(info, plist[0], theta, None)
    ids = torch.randint(0, 40, (3, 7))
    torch.testing.assert_close(compact(ids), embed(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "budget", "expected"), [
    ((512, 512), 130 * 1024, 128),   # 130 would fit: 128 costs 1.5 % of the budget
    ((512, 512), 12 * 1024, 12),     # 8 would cost a third: 12 stays
])
def test_ranks_round_down_to_multiples_of_8_when_that_is_cheap(shape, budget, expected):
    info = LayerInfo("layer", "linear", shape, False)
    assert LOWRANK.size_for_budget(info, budget) == expected


@pytest.mark.parametrize("whitened", [False, True])
def test_a_wide_weights_truncated_factors_keep_a_alone_and_make_b_again_from_w(whitened):
    torch.manual_seed(7)
    x = torch.randn(300, 40) * torch.linspace(0.1, 3, 40)
    weight = torch.randn(24, 40)
    info = LayerInfo("layer", "linear", (24, 40), False)
    stats = LayerStats((x.T @ x).double(), 300) if whitened else None
    factors = LOWRANK.factorize(info, weight, stats)
    kept = factors.truncated(10)
    assert kept.B is None and kept.A.shape == (24, 10)
    assert kept.weight.data_ptr() == weight.data_ptr()  # W itself, not a copy
    for rank in (1, 6, 10):
        torch.testing.assert_close(kept.second(rank), factors.B[:rank], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kept.product(rank), factors.A[:, :rank] @ factors.B[:rank],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stats", ["plain", "whitened", "rows"])
def test_a_tall_weight_keeps_b_and_makes_a_again_from_w(stats):
    # A vocabulary table's A is as large as the table: it is never kept, only two matrices
    # of the table's width from which A = W @ weight_to_A is made when it is asked for.
    torch.manual_seed(7)
    x = torch.randn(300, 24) * torch.linspace(0.1, 3, 24)
    weight = torch.randn(40, 24)
    kind = "embedding" if stats == "rows" else "linear"
    info = LayerInfo("layer", kind, (40, 24), False)
    given = {"plain": None, "whitened": LayerStats((x.T @ x).double(), 300),
             "rows": LayerStats(None, 80, torch.arange(40.0))}[stats]
    factors = LOWRANK.factorize(info, weight, given)
    assert factors.A is None and factors.weight_to_A.shape == (24, 24)
    kept = factors.truncated(10)
    assert kept.A is None and kept.B.shape == (10, 24) and kept.weight_to_A.shape == (24, 10)
    assert kept.weight.data_ptr() == weight.data_ptr()  # W itself, not a copy
    # The same decomposition as a matrix no taller than wide gives: W's transpose, transposed
    # back, where no statistics weigh the rows or columns.
    if stats == "plain":
        wide = LOWRANK.factorize(LayerInfo("t", "linear", (24, 40), False), weight.T, None)
        torch.testing.assert_close(kept.product(10), wide.product(10).T, rtol=1e-4, atol=1e-5)
    for rank in (1, 6, 10):
        A, B = kept.first(rank), kept.second(rank)
        assert A.shape == (40, rank) and A.dtype == torch.float32
        torch.testing.assert_close(A, factors.first(rank), rtol=0, atol=0)
        torch.testing.assert_close(kept.product(rank), A @ B, rtol=1e-4, atol=1e-5)
        assert kept.error(rank) == factors.error(rank)
    # at full rank the product is W again
    torch.testing.assert_close(factors.product(24), weight, rtol=1e-4, atol=1e-4)


def test_a_wide_embeddings_row_weighted_factors_keep_b():
    torch.manual_seed(8)
    table = torch.randn(12, 50)
    info = LayerInfo("embed", "embedding", (12, 50), False)
    factors = LOWRANK.factorize(info, table, LayerStats(None, 80, torch.arange(12.0)))
    kept = factors.truncated(5)
    assert kept.B is not None and kept.weight is None
    torch.testing.assert_close(kept.second(5), factors.B[:5], rtol=0, atol=0)


@pytest.mark.parametrize("stats", ["plain", "whitened", "rows"])
def test_a_tall_weight_is_decomposed_a_chunk_of_rows_at_a_time_as_a_whole_one_is(stats):
    # A vocabulary-sized table or head is never taken to float64 whole: its decomposition,
    # made from chunks of rows, is the SVD of the whole (weighted or whitened) matrix.
    from compressor.methods.lowrank import factors as module

    torch.manual_seed(8)
    rows, cols = 2 * module._ROWS_PER_CHUNK + 37, 24
    weight = torch.randn(rows, cols) * torch.linspace(0.2, 2, cols)
    info = LayerInfo("head", "embedding" if stats == "rows" else "linear", (rows, cols), False)
    x = torch.randn(500, cols, dtype=torch.float64) * torch.linspace(3, 0.1, cols,
                                                                     dtype=torch.float64)
    counts = torch.randint(0, 5, (rows,)).double()
    given = {"plain": None, "whitened": LayerStats(x.T @ x, 500),
             "rows": LayerStats(None, 1000, row_counts=counts)}[stats]
    factors = LOWRANK.factorize(info, weight, given)
    rank = 7
    if stats == "plain":
        U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
        want = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    elif stats == "rows":
        scale = (counts / counts.mean() + 1.0).sqrt()[:, None]
        U, S, Vh = torch.linalg.svd(weight.double() * scale, full_matrices=False)
        want = (U[:, :rank] * S[:rank]) @ Vh[:rank] / scale
    else:
        gram = x.T @ x
        L = torch.linalg.cholesky(gram + 1e-4 * gram.diagonal().mean() * torch.eye(cols))
        U, S, Vh = torch.linalg.svd(weight.double() @ L, full_matrices=False)
        want = torch.linalg.solve_triangular(L.T, ((U[:, :rank] * S[:rank]) @ Vh[:rank]).T,
                                             upper=True).T
    torch.testing.assert_close(factors.energy, S.pow(2), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(factors.product(rank).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_factors_are_made_on_the_weights_device_not_the_default_one(shape):
    # A tall W's A, and a wide one's B once truncated, are made again from W a chunk of rows
    # at a time: the scratch they are summed into must sit where W does (a GPU in
    # benchmarks/bench_finetune), whatever the default device. Under the meta default device,
    # a scratch tensor made without W's device cannot be mixed with W's CPU rows.
    torch.manual_seed(3)
    weight = torch.randn(*shape)
    info = LayerInfo("layer", "linear", shape, False)
    expected = LOWRANK.factorize(info, weight, None).truncated(8)
    with torch.device("meta"):
        kept = LOWRANK.factorize(info, weight, None).truncated(8)
        A, B = kept.first(8), kept.second(8)
    assert A.device.type == B.device.type == "cpu"
    assert torch.equal(A, expected.first(8)) and torch.equal(B, expected.second(8))
