"""Layer discovery (`plan/layers.py`) and the layer kinds (`runtime/layers.py`), on tiny models.

Pinned: `find_layers` finds every Linear, GPT-2 Conv1D, Conv1d, Conv2d and Embedding of a
program in graph order, with the facts of the module it came from (W's shape as (out, in, ...)
whatever the module stores, bias, stride, padding, dilation; a padding mode other than zeros
pads in the graph, so the conv itself pads nothing) and marks the layer whose result is a model
output (as is, or only reshaped); grouped convolutions, string padding, shared weights, weights
computed in the graph and any other parameter of two or more dimensions that the graph reads
are listed as skipped, once each, with the reason, and never as layers. For every entry of
`LAYER_KINDS`: the kind of its op is found, W is read from the stored tensor as (out, in, ...),
`apply(layer, x, W, bias)` is the layer's own op, `input_rows` cuts the input into rows of
`in_features` whose Gram matrix is what a weight change multiplies (a conv's unfolded patches:
‖ΔW·X‖² = tr(ΔW G ΔWᵀ)), `effect` and `output_rows` line those rows up with the op's outputs,
and an embedding's rows are the ids it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from compressor.plan.layers import find_layers
from compressor.runtime.layers import KIND_OF_OP, LAYER_KINDS, LayerInfo
from tests.support import corpus_programs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs


def _program_module(model: nn.Module, args: tuple = (), kwargs: dict | None = None):
    batch = Dim("batch", min=1, max=1024)
    kwargs = kwargs or {}
    dynamic = ({n: {0: batch} for n in kwargs} if kwargs else tuple({0: batch} for _ in args))
    return torch.export.export(model.eval(), args, kwargs=kwargs,
                               dynamic_shapes=dynamic).module()


def _w(module: nn.Module) -> torch.Tensor:
    """W of a module as (out, in, ...): GPT-2's Conv1D stores its transpose (in, out)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _expected_facts(module: nn.Module) -> dict:
    """What discovery must say of a module, read from the module itself."""
    facts = {"weight_shape": tuple(_w(module).shape),
             "has_bias": getattr(module, "bias", None) is not None}
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        pads_itself = module.padding_mode == "zeros"  # other modes pad in the graph first
        facts.update(stride=tuple(module.stride), dilation=tuple(module.dilation),
                     padding=(tuple(module.padding) if pads_itself
                              else (0,) * len(module.kernel_size)),
                     groups=module.groups)
    else:
        facts.update(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    return facts


_KIND_OF_MODULE = {nn.Linear: "linear", Conv1D: "addmm", nn.Conv1d: "conv1d",
                   nn.Conv2d: "conv2d", nn.Embedding: "embedding"}


class _Unusual(nn.Module):
    """Layers without biases and a conv whose facts all differ by axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                              bias=False)
        self.fc = nn.Linear(8, 6, bias=False)
        self.out = nn.Linear(6, 4)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.conv(image).mean((2, 3)))
        return self.out(h), h.sum(-1)  # `fc` feeds an output only through a sum


class _TiedHead(nn.Module):
    """An embedding whose table is also the output projection (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(ids))))


class _Gpt2Mlp(nn.Module):
    """GPT-2's MLP: two Conv1D (addmm with (in, out) weights), the second producing the output."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _BareParameters(nn.Module):
    """Weight matrices read by ops no layer kind covers: a matmul, an addmm with a scaled product,
    and a table added to the input; a norm's scale vector is not a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.scaled = Conv1D(8, 8)
        self.offsets = nn.Parameter(torch.randn(5, 8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.matmul(x, self.proj) + self.offsets)
        h = torch.addmm(self.scaled.bias, h.reshape(-1, 8), self.scaled.weight, alpha=0.5)
        return self.fc(h.reshape(x.shape))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                        use_cache=False)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, lambda: torch.export.export(
        model.eval(), (), {"input_ids": ids},
        dynamic_shapes={"input_ids": {0: Dim("batch"), 1: Dim.AUTO}}).module()


def _tiny(kind: str):
    model = MODEL_CLASSES[kind]()
    return model, lambda: _program_module(model, kwargs=example_inputs(model))


def _corpus(build: Callable[[], corpus_programs.Export]):
    torch.manual_seed(0)
    spec = build()
    return spec.model, lambda: torch.export.export(
        spec.model.eval(), spec.args, kwargs=spec.kwargs,
        dynamic_shapes=spec.dynamic_shapes).module()


@dataclass(frozen=True)
class Discovery:
    """A model, the layers discovery must find (in order), the output layers, and the skipped."""

    name: str
    model: Callable[[], tuple[nn.Module, Callable]]
    layers: tuple[str, ...]
    outputs: tuple[str, ...]
    skipped: dict[str, str]  # name -> a fragment of the reason

    def __str__(self) -> str:
        return self.name


DISCOVERIES = [
    Discovery("mlp", lambda: _tiny("mlp"), ("fc1", "fc2", "head"), ("head",), {}),
    Discovery("conv", lambda: _tiny("conv"), ("conv1", "conv2", "head"), ("head",), {}),
    Discovery("text", lambda: _tiny("text"),
              ("embed", "query", "key", "value", "mlp_in", "mlp_out", "classifier"),
              ("classifier",), {}),
    Discovery("unusual", lambda: (m := _Unusual(), lambda: _program_module(
        m, (torch.randn(2, 3, 9, 8),))), ("conv", "fc", "out"), ("out",), {}),
    Discovery("conv_zoo", lambda: _corpus(corpus_programs._conv_zoo),
              ("stem", "dilated", "reflect", "circular", "head"), ("head",),
              {"depthwise": "grouped convolution (groups=32)",
               "grouped": "grouped convolution (groups=4)"}),
    Discovery("conv1d", lambda: _corpus(corpus_programs._conv1d), ("conv1", "conv2", "head"),
              ("head",), {}),
    Discovery("gpt2_mlp", lambda: (m := _Gpt2Mlp(), lambda: _program_module(
        m, (torch.randn(2, 5, 8),))), ("c_fc", "c_proj"), ("c_proj",), {}),
    Discovery("gpt2", _gpt2,
              ("transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
               "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"),
              ("lm_head",), {}),  # the tied table: the head's weight, one layer
    Discovery("bare_parameters", lambda: (m := _BareParameters(), lambda: _program_module(
        m, (torch.randn(2, 5, 8),))), ("fc",), ("fc",),
              {"proj": "(8, 8) parameter is read by aten.matmul",
               "offsets": "(5, 8) parameter is read by aten.add.Tensor",
               "scaled": "addmm with beta=1, alpha=0.5"}),
    Discovery("shared_layer", lambda: _corpus(corpus_programs._shared_layer), ("inp", "out"),
              ("out",), {"shared": "shared with other operations"}),
    Discovery("same_padding", lambda: _corpus(corpus_programs._same_padding), ("conv", "head"),
              ("head",), {"same": "padding given as a string"}),
    Discovery("computed_weight", lambda: _corpus(corpus_programs._computed_weight), ("fc",),
              ("fc",), {"linear": "computed in the graph",
                        "direction": "(64, 32) parameter is read by aten.div.Tensor, "
                                     "aten.linalg_vector_norm"}),
    Discovery("tied_head", lambda: (m := _TiedHead(), lambda: _program_module(
        m, (torch.randint(0, 50, (2, 5)),))), ("mid", "head"), ("head",), {}),
]


@pytest.mark.parametrize("case", DISCOVERIES, ids=str)
def test_find_layers_finds_each_layer_with_its_modules_facts(case):
    model, export = case.model()
    layers, skipped = find_layers(export())
    assert [layer.name for layer in layers] == list(case.layers)
    assert [layer.name for layer in layers if layer.produces_output] == list(case.outputs)
    for layer in layers:
        module = model.get_submodule(layer.name)
        assert layer.kind == _KIND_OF_MODULE[type(module)], layer
        facts = {field: getattr(layer, field) for field in _expected_facts(module)}
        assert facts == _expected_facts(module), layer.name


@pytest.mark.parametrize("case", DISCOVERIES, ids=str)
def test_find_layers_lists_what_it_cannot_compress_once_with_the_reason(case):
    _, export = case.model()
    layers, skipped = find_layers(export())
    assert len(skipped) == len({s.name for s in skipped})  # a layer called twice: one entry
    assert {s.name for s in skipped} == set(case.skipped)
    for entry in skipped:
        assert case.skipped[entry.name] in entry.reason, entry
    assert not {s.name for s in skipped} & {layer.name for layer in layers}


# -- the layer kinds -----------------------------------------------------------------------------


def _linear():
    return nn.Linear(5, 7), torch.randn(3, 4, 5)


def _addmm():
    # GPT-2's Conv1D on rows (its op's own input: a 2-D view of the tokens).
    return Conv1D(7, 5), torch.randn(6, 5)


def _conv1d():
    conv = nn.Conv1d(3, 6, 3, stride=2, padding=2, dilation=2)
    return conv, torch.randn(2, 3, 11)


def _conv2d():
    conv = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    return conv, torch.randn(2, 3, 9, 8)


def _embedding():
    ids = torch.randint(0, 20, (3, 11))
    ids[0, :5] = 7  # one row read many times, some rows never
    return nn.Embedding(20, 6), ids


# A module of every kind, and an input it takes.
KIND_MODULES = {"linear": _linear, "addmm": _addmm, "conv1d": _conv1d, "conv2d": _conv2d,
                "embedding": _embedding}


@dataclass
class Layer:
    module: nn.Module
    x: torch.Tensor
    info: LayerInfo

    @property
    def spec(self):
        return self.info.spec


def _found(kind: str) -> Layer:
    """The module of `kind` in a one-layer program, and the LayerInfo discovery gives it."""
    torch.manual_seed(0)
    module, x = KIND_MODULES[kind]()

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * 2

    layers, skipped = find_layers(_program_module(One(), (x,)))
    assert not skipped and len(layers) == 1
    return Layer(module.eval(), x, layers[0])


def test_every_registered_kind_is_checked_here():
    assert set(KIND_MODULES) == set(LAYER_KINDS)
    for kind in LAYER_KINDS.values():
        assert all(KIND_OF_OP[op] is kind for op in kind.ops)


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_discovery_gives_the_layer_its_kind_and_facts(kind):
    layer = _found(kind)
    assert layer.info.kind == kind and layer.spec is LAYER_KINDS[kind]
    facts = {field: getattr(layer.info, field) for field in _expected_facts(layer.module)}
    assert facts == _expected_facts(layer.module)
    assert layer.info.out_features == _w(layer.module).shape[0]
    assert layer.info.in_features == _w(layer.module)[0].numel()
    assert layer.info.stored_shape == tuple(layer.module.weight.shape)
    # W as every stage reads it: a view of the stored tensor, in (out, in, ...) layout.
    weight = layer.spec.weight_of(layer.module.weight)
    assert torch.equal(weight, _w(layer.module)) and weight.data_ptr() == layer.module.weight.data_ptr()


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_apply_is_the_layers_own_op(kind):
    layer = _found(kind)
    weight, bias = layer.spec.weight_of(layer.module.weight.detach()), getattr(layer.module, "bias", None)
    with torch.no_grad():
        torch.testing.assert_close(layer.spec.apply(layer.info, layer.x, weight, bias),
                                   layer.module(layer.x), rtol=0, atol=0)
        other = torch.randn_like(weight)  # any weight of the layout, not only the module's
        with_other = layer.spec.apply(layer.info, layer.x, other, None)
        layer.spec.weight_of(layer.module.weight).copy_(other)
        if bias is not None:
            bias.zero_()
        torch.testing.assert_close(with_other, layer.module(layer.x), rtol=1e-6, atol=1e-6)


def _gram_by_hand(layer: Layer) -> torch.Tensor:
    """Σ x xᵀ over what the op multiplies W by: input vectors, or a conv's unfolded patches."""
    x = layer.x.double()
    if isinstance(layer.module, nn.Conv2d):
        conv = layer.module
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                           stride=conv.stride)  # (N, in·kh·kw, positions)
        return torch.einsum("nip,njp->ij", patches, patches)
    if isinstance(layer.module, nn.Conv1d):
        conv = layer.module
        (k,), (stride,), (pad,), (dilation,) = (conv.kernel_size, conv.stride, conv.padding,
                                                 conv.dilation)
        span = dilation * (k - 1) + 1  # each window, its taps `dilation` apart
        windows = F.pad(x, (pad, pad)).unfold(2, span, stride)[..., ::dilation]  # (N, C, P, k)
        patches = windows.permute(0, 1, 3, 2).reshape(x.shape[0], -1, windows.shape[2])
        return torch.einsum("nip,njp->ij", patches, patches)
    flat = x.reshape(-1, x.shape[-1])
    return flat.T @ flat


@pytest.mark.parametrize("kind", sorted(k for k in LAYER_KINDS if not LAYER_KINDS[k].reads_rows))
def test_input_rows_are_what_the_op_multiplies_w_by(kind):
    layer = _found(kind)
    info, spec = layer.info, layer.spec
    rows = spec.input_rows(info, layer.x)
    assert rows.dim() == 2 and rows.shape[1] == info.in_features
    gram = rows.double().T @ rows.double()
    torch.testing.assert_close(gram, _gram_by_hand(layer), rtol=1e-10, atol=1e-9)
    # A weight change, as a matrix: what it does to the outputs is rows @ ΔWᵀ, output by output.
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(info.out_features, info.in_features, generator=g, dtype=torch.float64)
    change = spec.output_rows(info, spec.apply(info, layer.x.double(),
                                               delta.reshape(info.weight_shape), None))
    assert change.shape == (rows.shape[0], info.out_features)
    torch.testing.assert_close(spec.effect(info, rows.double(), delta), change,
                               rtol=1e-10, atol=1e-10)
    # So the Gram matrix prices any change: ‖ΔW X‖² = tr(ΔW G ΔWᵀ).
    torch.testing.assert_close(change.square().sum(), torch.trace(delta @ gram @ delta.T),
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("kind", sorted(k for k in LAYER_KINDS if LAYER_KINDS[k].reads_rows))
def test_a_table_reads_the_rows_of_its_ids(kind):
    layer = _found(kind)
    info, spec = layer.info, layer.spec
    rows = spec.input_rows(info, layer.x)
    assert torch.equal(rows, layer.x.reshape(-1))
    delta = torch.randn(info.weight_shape, dtype=torch.float64)
    change = spec.output_rows(info, spec.apply(info, layer.x, delta, None))
    assert change.shape == (rows.numel(), info.in_features)
    torch.testing.assert_close(spec.effect(info, rows, delta), change, rtol=0, atol=0)
    # Row read counts price a change as a Gram matrix would: Σ_r count_r ‖ΔW_r‖².
    counts = torch.bincount(rows, minlength=info.out_features).double()
    torch.testing.assert_close(change.square().sum(),
                               (counts * delta.square().sum(1)).sum(), rtol=1e-12, atol=1e-12)
