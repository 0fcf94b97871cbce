"""What a layer is to every stage: its kind (one registry), its weight's facts, its input statistics.

A *layer kind* says which graph ops are that layer, where the op keeps its input and its weight,
in what layout the module stores that weight, how it cuts its input into rows of `in_features`
(the rows a Gram matrix sums, the rows a weight error multiplies), how its outputs line up as
rows of output features, and how a compact module applies a weight of that layout. Graph
discovery, calibration, the sensitivities, the sequential correction, the report's layer errors
and every method's compact module read these facts from here; a new kind is one entry below.

Every stage and every method sees a layer's weight W as (out, in, *kernel)
(`LayerInfo.weight_shape`). A kind whose module stores the transpose, (in, out) (GPT-2's
`Conv1D`, which is `addmm(bias, x, weight)`), says so (`LayerKind.stores_transposed`); the
stored tensor is read as W through `layer_weight`, and a method's parametrization of W is
registered on the stored tensor through `LayerKind.stored_parametrization`. Nothing outside
this module turns one layout into the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer of the program: a weight of a known kind and its use.

    An embedding table (rows, dim) is seen as a matrix of `rows` outputs by `dim` inputs, so
    `A @ B` is a narrow table A (rows × r) times a projection B (r × dim). A conv's stride,
    padding and dilation have one entry per kernel axis (two for a Conv2d, one for a Conv1d).
    """

    name: str  # dotted module name, e.g. "encoder.0.dense"; the weight is f"{name}.weight"
    kind: str  # a registered kind's name (`LAYER_KINDS`)
    # W as every stage and method sees it: (out, in), (out, in, kh, kw), (out, in, k) or
    # (rows, dim); the module may store its transpose (`stored_shape`).
    weight_shape: tuple[int, ...]
    has_bias: bool
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    produces_output: bool = False  # its result is one of the model's outputs, as is
    # An embedding call reads this weight too: an LM's output head tied to its input table.
    # One θ serves both uses (rows gathered for the input, a matmul for the head), and its
    # gradient is the sum of both uses' gradients.
    tied_embedding: bool = False

    def __post_init__(self) -> None:
        kind = LAYER_KINDS.get(self.kind)
        if kind is None or not kind.has_kernel:
            return
        axes = len(self.weight_shape) - 2
        for field in ("stride", "padding", "dilation"):
            if len(getattr(self, field)) != axes:
                raise ValueError(f"{self.kind} layer {self.name!r}: {field} "
                                 f"{getattr(self, field)} needs one entry per kernel axis "
                                 f"({axes}: the kernel is {self.weight_shape[2:]})")

    @property
    def spec(self) -> LayerKind:
        """The registered kind of this layer."""
        return LAYER_KINDS[self.kind]

    @property
    def out_features(self) -> int:
        """Rows of W: output features, or output channels of a conv."""
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of W seen as a matrix: `in`, or `in * kh * kw` for a conv."""
        return math.prod(self.weight_shape[1:])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """(kh, kw) of a Conv2d, (k,) of a Conv1d; (1, 1) for a kind without a kernel."""
        return tuple(self.weight_shape[2:]) if self.spec.has_kernel else (1, 1)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the tensor the module holds: `weight_shape`, or its transpose."""
        return self.weight_shape[::-1] if self.spec.stores_transposed else self.weight_shape

    @property
    def numel(self) -> int:
        """Numbers in the dense weight."""
        return math.prod(self.weight_shape)


@dataclass
class LayerStats:
    """Calibration statistics of a layer's input, and what its method prepared from them.

    `gram` is the sum over calibration rows x (in_features each; unfolded patches for a conv)
    of x xᵀ, in float64; `rows` is how many rows were summed. An embedding has no Gram but
    `row_counts`: how many times each of its rows was read. `prepared` is what the layer's
    method made of them during calibration (`Method.prepare`: lowrank's decomposition), read
    again by the allocation and the initialization.
    """

    gram: torch.Tensor | None
    rows: int = 0
    row_counts: torch.Tensor | None = None
    prepared: object | None = None


# Rows multiplied at a time when a Gram matrix is accumulated.
_ROWS_PER_CHUNK = 4096
# A float64 product aᵀb past this many multiply-adds is computed in float32 chunks.
_FLOAT64_PRODUCT_MACS = 1 << 33


def add_product_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Add aᵀ b to `total` in place, `_ROWS_PER_CHUNK` rows at a time (no copy of `a` or `b`
    in `total`'s dtype is made whole).

    Each chunk is multiplied in `total`'s dtype, except that a float64 product of more than
    `_FLOAT64_PRODUCT_MACS` multiply-adds (a large model's) multiplies each chunk in float32,
    twice as fast, and sums the chunks in float64: the rounding is then that of one chunk's sum.
    """
    macs = a.shape[0] * a.shape[1] * b.shape[1]
    dtype = torch.float32 if macs > _FLOAT64_PRODUCT_MACS else total.dtype
    for start in range(0, a.shape[0], _ROWS_PER_CHUNK):
        part_a = a[start:start + _ROWS_PER_CHUNK].to(dtype)
        part_b = part_a if b is a else b[start:start + _ROWS_PER_CHUNK].to(dtype)
        total += (part_a.T @ part_b).to(total.dtype)
    return total


@dataclass
class InputMoments:
    """The second moments of a layer's inputs in the original (X) and compressed (X') model,
    rows as samples: G = XᵀX, C = XᵀX', G' = X'ᵀX' (float64, in_features²): what a method's
    sequential correction fits a layer's θ to (`Method.correct_`)."""

    gram: torch.Tensor
    cross: torch.Tensor
    student_gram: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, x_student: torch.Tensor) -> InputMoments:
        """Accumulate over chunks of rows (`add_product_`): no float64 copy of the inputs."""
        width = x.shape[1]
        gram, cross, student_gram = (torch.zeros(width, width, dtype=torch.float64)
                                     for _ in range(3))
        return cls(add_product_(gram, x, x), add_product_(cross, x, x_student),
                   add_product_(student_gram, x_student, x_student))

    def add_(self, other: InputMoments) -> InputMoments:
        """Add `other`'s moments (more rows of the same layer's inputs) to these, in place."""
        self.gram += other.gram
        self.cross += other.cross
        self.student_gram += other.student_gram
        return self


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer: the ops that are it and how its input, weight and output line up."""

    name: str
    ops: tuple[object, ...]  # the aten overloads that are this layer
    input_arg: int  # where the op keeps its input among its arguments
    weight_arg: int  # ... and its weight
    # Whether the op reads rows of W by index (an embedding) instead of multiplying its input
    # by W: its statistics are row read counts, not a Gram matrix.
    reads_rows: bool
    has_kernel: bool  # W is (out, in, *kernel): the op slides it over its input
    # The op's facts besides the weight's shape (bias, stride, ...), or the reason it is skipped.
    describe: Callable[[fx.Node], dict | str]
    # The weight applied to an input: what a compact module computes with W (or a part of it).
    apply: Callable[[LayerInfo, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    # The input as rows of `in_features` (ids, flattened, for a kind that reads rows).
    input_rows: Callable[[LayerInfo, torch.Tensor], torch.Tensor]
    # The op's output (or its gradient) as rows of output features.
    output_rows: Callable[[LayerInfo, torch.Tensor], torch.Tensor]
    # The module stores W's transpose, (in, out): the op reads it so (GPT-2's Conv1D).
    stores_transposed: bool = False

    def weight_of(self, stored: torch.Tensor) -> torch.Tensor:
        """Return W, (out, in, ...), from the tensor the module stores (a view, not a copy)."""
        return stored.T if self.stores_transposed else stored

    def stored_parametrization(self, parametrization: nn.Module) -> nn.Module:
        """Return the parametrization of the stored tensor that a method's parametrization of
        W (`forward(*θ) -> W`, `right_inverse(W) -> θ`) amounts to for this kind."""
        return TransposedWeight(parametrization) if self.stores_transposed else parametrization

    def effect(self, layer: LayerInfo, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Return what a weight change (out × in, as a matrix) does to the outputs of `rows`."""
        return weight[rows] if self.reads_rows else rows @ weight.T

    def __str__(self) -> str:
        return self.name


class TransposedWeight(nn.Module):
    """Parametrize a weight stored as (in, out) by a method's parametrization of its transpose
    W (out, in): the stored tensor is W.T, a view of what the method computes."""

    def __init__(self, method_parametrization: nn.Module) -> None:
        super().__init__()
        self.method_parametrization = method_parametrization

    def forward(self, *theta: torch.Tensor) -> torch.Tensor:
        return self.method_parametrization(*theta).T

    def right_inverse(self, stored: torch.Tensor) -> object:
        """Return the method's θ of W = `stored`.T."""
        return self.method_parametrization.right_inverse(stored.T)


def method_parametrization(stored: nn.Module) -> nn.Module:
    """Return a method's own parametrization of W from what is registered on the stored tensor
    (`LayerKind.stored_parametrization`)."""
    return stored.method_parametrization if isinstance(stored, TransposedWeight) else stored


def layer_weight(module: nn.Module, layer: LayerInfo) -> torch.Tensor:
    """Return W of `layer` in `module`, (out, in, ...) whatever the stored layout (a view)."""
    return layer.spec.weight_of(module.get_submodule(layer.name).weight)


def _as_tuple(value: object, default: int, axes: int) -> tuple[int, ...]:
    """Return a conv argument (None, an int, or one or `axes` ints) as `axes` ints."""
    if value is None:
        return (default,) * axes
    if isinstance(value, int):
        return (value,) * axes
    items = tuple(int(v) for v in value)  # type: ignore[union-attr]
    return items * axes if len(items) == 1 else items[:axes]


def _describe_linear(node: fx.Node) -> dict:
    return {"has_bias": (node.args[2] if len(node.args) > 2 else None) is not None}


def _describe_addmm(node: fx.Node) -> dict | str:
    # addmm(bias, x, weight): a layer when the added term is its own module's bias and the
    # product is not scaled, as GPT-2's Conv1D calls it. `weight` is a parameter (checked by
    # discovery before the kind describes the op).
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1:
        return (f"addmm with beta={beta}, alpha={alpha} (only addmm(bias, x, weight), as GPT-2's "
                "Conv1D computes it, is rewritten)")
    bias, weight = node.args[0], node.args[2]
    own_bias = weight.target.removesuffix("weight") + "bias"
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == own_bias):
        return ("addmm whose added term is not its own module's `bias` (only addmm(bias, x, "
                "weight), as GPT-2's Conv1D computes it, is rewritten)")
    return {"has_bias": True}


def _describe_conv(axes: int) -> Callable[[fx.Node], dict | str]:
    def describe(node: fx.Node) -> dict | str:
        args = list(node.args) + [None] * (7 - len(node.args))
        groups = int(args[6] or 1)
        if groups != 1:
            return f"grouped convolution (groups={groups})"
        return {"has_bias": args[2] is not None, "stride": _as_tuple(args[3], 1, axes),
                "padding": _as_tuple(args[4], 0, axes), "dilation": _as_tuple(args[5], 1, axes),
                "groups": groups}
    return describe


def _conv2d_rows(layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                       stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, layer.in_features)


def _conv1d_rows(layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    # A (N, C, L) signal is a (N, C, 1, L) image under a (1, k) kernel.
    patches = F.unfold(x.unsqueeze(2), (1, *layer.kernel_size), dilation=(1, *layer.dilation),
                       padding=(0, *layer.padding), stride=(1, *layer.stride))
    return patches.transpose(1, 2).reshape(-1, layer.in_features)


def _addmm(layer: LayerInfo, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    # W.T is the stored (in, out) tensor again when `weight` is `weight_of(stored)`.
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


LINEAR = LayerKind(
    "linear", (torch.ops.aten.linear.default,), input_arg=0, weight_arg=1, reads_rows=False,
    has_kernel=False, describe=_describe_linear,
    apply=lambda layer, x, weight, bias: F.linear(x, weight, bias),
    input_rows=lambda layer, x: x.reshape(-1, layer.in_features),
    output_rows=lambda layer, y: y.reshape(-1, layer.out_features))
ADDMM = LayerKind(  # GPT-2's Conv1D: x (rows, in) times a weight stored (in, out), plus bias
    "addmm", (torch.ops.aten.addmm.default,), input_arg=1, weight_arg=2, reads_rows=False,
    has_kernel=False, describe=_describe_addmm, apply=_addmm,
    input_rows=lambda layer, x: x.reshape(-1, layer.in_features),
    output_rows=lambda layer, y: y.reshape(-1, layer.out_features), stores_transposed=True)
CONV1D = LayerKind(
    "conv1d", (torch.ops.aten.conv1d.default,), input_arg=0, weight_arg=1, reads_rows=False,
    has_kernel=True, describe=_describe_conv(1),
    apply=lambda layer, x, weight, bias: F.conv1d(x, weight, bias, layer.stride, layer.padding,
                                                  layer.dilation, layer.groups),
    input_rows=_conv1d_rows,
    # (N, out, L) -> one row per output position
    output_rows=lambda layer, y: y.movedim(1, -1).reshape(-1, layer.out_features))
CONV2D = LayerKind(
    "conv2d", (torch.ops.aten.conv2d.default,), input_arg=0, weight_arg=1, reads_rows=False,
    has_kernel=True, describe=_describe_conv(2),
    apply=lambda layer, x, weight, bias: F.conv2d(x, weight, bias, layer.stride, layer.padding,
                                                  layer.dilation, layer.groups),
    input_rows=_conv2d_rows,
    # (N, out, H, W) -> one row per output position
    output_rows=lambda layer, y: y.movedim(1, -1).reshape(-1, layer.out_features))
EMBEDDING = LayerKind(
    "embedding", (torch.ops.aten.embedding.default,), input_arg=1, weight_arg=0,
    reads_rows=True, has_kernel=False, describe=lambda node: {"has_bias": False},
    apply=lambda layer, ids, weight, bias: F.embedding(ids, weight),
    input_rows=lambda layer, ids: ids.reshape(-1),
    # each looked-up row is `dim` (= in_features) wide
    output_rows=lambda layer, y: y.reshape(-1, layer.in_features))

LAYER_KINDS: dict[str, LayerKind] = {kind.name: kind for kind in (LINEAR, ADDMM, CONV1D, CONV2D,
                                                                  EMBEDDING)}
# Each layer op and its kind.
KIND_OF_OP: dict[object, LayerKind] = {op: kind for kind in LAYER_KINDS.values()
                                       for op in kind.ops}

# What the layer kinds are, for a user reading why a weight was left alone.
REWRITTEN_LAYERS = ("Linear, GPT-2's Conv1D (addmm), Conv1d, Conv2d (groups=1) and Embedding "
                    "layers")
_NOT_REWRITTEN = f"only {REWRITTEN_LAYERS} are rewritten"
# Weight-bearing ops of no kind: layer discovery lists them as skipped, with the reason.
UNSUPPORTED_OPS: dict[object, str] = {
    torch.ops.aten.conv1d.padding: "Conv1d with padding given as a string ('same' / 'valid'); "
                                   "export it with numeric padding to compress it",
    torch.ops.aten.conv2d.padding: "Conv2d with padding given as a string ('same' / 'valid'); "
                                   "export it with numeric padding to compress it",
    torch.ops.aten.conv3d.default: f"3-D convolution ({_NOT_REWRITTEN})",
    torch.ops.aten.conv_transpose1d.default: "transposed convolution (not supported)",
    torch.ops.aten.conv_transpose2d.input: "transposed convolution (not supported)",
    torch.ops.aten.conv_transpose3d.input: "transposed convolution (not supported)",
}


def empty_stats(layer: LayerInfo, dtype: torch.dtype = torch.float64) -> LayerStats:
    """Return zero statistics for `layer`: a Gram matrix, or row read counts."""
    if layer.spec.reads_rows:
        return LayerStats(None, row_counts=torch.zeros(layer.out_features, dtype=torch.float64))
    return LayerStats(torch.zeros(layer.in_features, layer.in_features, dtype=dtype))


def rows_layout(layer: LayerInfo) -> tuple:
    """What decides how a layer cuts its input into rows (`LayerKind.input_rows`): layers
    reading one tensor with equal layouts see equal rows, so their statistics can be shared."""
    return (layer.kind, layer.in_features, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation)

