"""Quantization-aware distillation: fine-tune θ through the int8 arithmetic it will run in.

onnxruntime's dynamic int8 (`compressor.export.quantize`) costs fidelity that fine-tuning in
float never sees: MiniLM keeps cosine 0.993 with it, a compressed MiniLM that keeps 0.995 in
float keeps 0.988. Here the student's compact form (the graph that is exported and quantized)
runs under `Int8Simulation`, which computes every op onnxruntime quantizes as onnxruntime will,
with fake quantization (values rounded to the int8 / uint8 grid, gradients passed straight
through the rounding, as ModelOpt's and PyTorch's QAT do):

- MatMul with a constant weight (a Linear or GPT-2's Conv1D, exported as MatMul then Add; a
  tensor times a parameter): the weight symmetric int8 per output column (7 bits, [-64, 64]:
  see `quantize_int8`), its input uint8 per tensor, range from the tensor itself
  (DynamicQuantizeLinear).
- Conv stays float: the product's int8 leaves convolutions alone (`quantize_int8`).
- Gather from a constant table only that lookup reads (an embedding): the table in 4 bits,
  blocks of `INT4_BLOCK_SIZE` entries of a row with a scale and zero point each
  (GatherBlockQuantized, see `quantize_int8`); the rows come out float, and a MatMul reading
  them quantizes them as any input. (A table one module looks up twice under one name is
  simulated so too, where the export keeps it uint8: no model here does that.)
- Gather from a constant table something else reads too (a tied table's rows, a table with
  two names): the table uint8 per tensor; the rows looked up stay on that grid, so a MatMul
  that reads them is not quantized again, and a MatMul reading the table itself as its weight
  (a tied head's Aᵀ) reuses that uint8 quantization. A Linear reading the table (a dense tied
  head) does too when the table is larger than the exporter's constant-folding limit (8,192
  numbers), and then its input stays float (`UNFOLDED_SHARED_TRANSPOSE`; Gemma-3 270M's head:
  a per-tensor uint8 table, where the simulation had per-column 7-bit weights and a uint8
  input).

Exact to float rounding on small models, the simulation cannot be exact on a model whose int8
is chaotic: Gemma-3 270M's int8 logits move by 0.15 relative L2 (as far as from the float
model's) when its embedding table is scaled by 1 + 2⁻²² (an ulp's change can flip a uint8
rounding by one step of a range in the hundreds, and the flips compound over 18 layers), so
PyTorch's and onnxruntime's float ops alone set the simulated and the real int8 model apart
by as much; the two are alike in distribution, not bit for bit.

With the activation smoothing the export applies before int8 (`export.int8_smoothing`,
`compressor.export.smoothing`), each smoothed MatMul runs as the smoothed model will: its input
divided by the factors s measured once on the calibration samples, its weight's columns times s,
then both quantized as above (in float the product is the same; on the int8 grid it is not).

The compact modules' θ tensors share storage with the parametrized student's θ, so what this
trains is what the student, and then the exported artifact, holds. The int8 artifact is still
scored for real in onnxruntime afterwards: the simulation is how θ learns, not a verdict.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import torch
from onnxscript.optimizer import constant_folding
from torch import fx, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from compressor.export.quantize import INT4_BLOCK_SIZE
from compressor.plan.planning import Plan
from compressor.rewrite.forms import COMPACT_PREFIX, factorize

_INT8_MAX = 64.0  # symmetric 7-bit weights: [-64, 64] (`quantize_int8`: reduce_range)
# A Linear's weight is exported as Transpose(W) before its MatMul, and onnxscript's constant
# folding (`compressor.export.onnx.optimize_onnx`, with onnxscript's default input limit) makes
# that a transposed initializer (int8 per column, the MatMul quantized like any other) unless W
# holds more than this many numbers and something else reads it too (a tied table its rows are
# gathered from): then onnxruntime's quantizer transposes the table's uint8 and dequantizes it
# for a float MatMul.
UNFOLDED_SHARED_TRANSPOSE = constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
_UINT8_MAX = 255.0  # asymmetric uint8 activations and tables: [0, 255]
_UINT4_MAX = 15.0  # asymmetric 4-bit blocks of a lookup table: [0, 15]

_LINEAR = (torch.ops.aten.linear.default, F.linear)
_EMBEDDING_ATEN = (torch.ops.aten.embedding.default,)  # (weight, ids, ...)
_EMBEDDING_FUNCTIONAL = (F.embedding,)  # (ids, weight, ...)
_INDEX_SELECT = (torch.index_select, torch.ops.aten.index_select.default)  # (table, dim, ids)
_ADDMM = (torch.ops.aten.addmm.default, torch.addmm)  # (bias, x, weight (in, out))
_MATMUL = (torch.ops.aten.matmul.default, torch.matmul, torch.Tensor.matmul,
           torch.Tensor.__matmul__)


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` in the forward pass, the identity's gradient to `value` in the backward."""
    return value + (rounded - value).detach()


def fake_int8_symmetric(weight: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`weight` on onnxruntime's symmetric int8 grid: scale max|w| / 127 per slice along `axis`
    (None: one scale for the tensor), zero point 0."""
    with torch.no_grad():
        if axis is None:
            amax = weight.detach().abs().amax()
        else:
            dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
            amax = weight.detach().abs().amax(dim=dims, keepdim=True)
        scale = (amax / _INT8_MAX).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        rounded = (torch.clamp(torch.round(weight / scale), -_INT8_MAX, _INT8_MAX) * scale
                   ).to(weight.dtype)
    return _straight_through(weight, rounded)


def uint8_grid(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the scale and zero point of onnxruntime's uint8 grid for the whole of `value`
    (DynamicQuantizeLinear, and an activation-typed initializer): range [min(x, 0), max(x, 0)]
    in 255 steps, zero point rounded."""
    with torch.no_grad():
        low = torch.clamp(value.detach().amin(), max=0).float()
        high = torch.clamp(value.detach().amax(), min=0).float()
        scale = (high - low) / _UINT8_MAX
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero_point = torch.clamp(torch.round(-low / scale), 0, _UINT8_MAX)
    return scale, zero_point


def fake_uint8_asymmetric(value: torch.Tensor,
                          grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`value` on onnxruntime's uint8 grid for the whole tensor (`uint8_grid`), or on `grid`,
    that of the tensor it was taken from (rows gathered from a table: rounding is elementwise,
    so the rows of the rounded table are the rounded rows, without rounding the whole table)."""
    scale, zero_point = uint8_grid(value) if grid is None else grid
    with torch.no_grad():
        steps = torch.clamp(torch.round(value / scale) + zero_point, 0, _UINT8_MAX)
        rounded = ((steps - zero_point) * scale).to(value.dtype)
    return _straight_through(value, rounded)


def fake_uint4_blocks(rows: torch.Tensor, block: int = INT4_BLOCK_SIZE) -> torch.Tensor:
    """`rows` (..., n) on the grid of a 4-bit lookup table (`MatMulNBitsQuantizer`'s
    asymmetric blocks along a row): each `block` consecutive entries of a row get the scale
    (max(x, 0) − min(x, 0)) / 15 and a rounded zero point (an all-zero block: 0). A row's
    rounding depends on that row only, so rows looked up and then rounded are the rounded
    table's rows."""
    length = rows.shape[-1]
    with torch.no_grad():
        # zeros in the last block's padding change no range: each block's includes 0
        padded = F.pad(rows.detach().float(), (0, (-length) % block))
        blocks = padded.reshape(*padded.shape[:-1], -1, block)
        low = blocks.amin(-1, keepdim=True).clamp(max=0)
        high = blocks.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / _UINT4_MAX
        empty = scale == 0
        zero_point = torch.where(empty, 8.0, -low / scale).round().clamp(0, _UINT4_MAX)
        steps = torch.where(empty, 8.0, blocks / scale + zero_point).round().clamp(0, _UINT4_MAX)
        rounded = ((steps - zero_point) * scale).reshape(padded.shape)[..., :length]
    return _straight_through(rows, rounded.to(rows.dtype))


class Int8Simulation(TorchFunctionMode):
    """Run the ops onnxruntime's dynamic int8 quantizes as it will run them (see the module).

    `constants` are the tensors that are initializers in the exported graph (the module's
    parameters and buffers): only an op whose weight is one of them is quantized. `shared`:
    those of them int8 keeps as a uint8 table for every reader (`_read_beyond_lookups`).
    """

    def __init__(self, constants: Iterable[torch.Tensor],
                 smoothing: dict[int, torch.Tensor] | None = None,
                 shared: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.constants = {id(t) for t in constants}
        self.shared = {id(t) for t in shared}
        # By weight (id): the factors its MatMul's input is divided by, and its columns times.
        self.smoothing = smoothing or {}
        # Outputs already on a uint8 grid (looked-up rows), held so that their ids stay theirs.
        self.on_grid: dict[int, torch.Tensor] = {}
        # Constant tables rows were gathered from, by id, with their uint8 grid: onnxruntime
        # quantizes such an initializer once, uint8 per tensor, and a MatMul reading it as is
        # (a tied head's Aᵀ) reuses that.
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _LINEAR:
            return self._linear(func, *args, **kwargs)
        if func in _MATMUL:
            return self._matmul(func, *args, **kwargs)
        if func in _ADDMM:
            return self._addmm(func, *args, **kwargs)
        if func in _EMBEDDING_ATEN:
            return self._embedding(func, args[0], args[1], args[2:], kwargs, weight_first=True)
        if func in _EMBEDDING_FUNCTIONAL:
            return self._embedding(func, args[1], args[0], args[2:], kwargs, weight_first=False)
        if func in _INDEX_SELECT and self._constant(args[0]):  # a tied table's rows
            return self._rows(args[0], func(*args, **kwargs), shared=True)
        return func(*args, **kwargs)

    def _constant(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self.constants

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if id(x) in self.on_grid else fake_uint8_asymmetric(x)

    def _linear(self, func, x, weight, *rest, **kwargs):  # noqa: ANN001
        if weight.dim() != 2 or not self._constant(weight):
            return func(x, weight, *rest, **kwargs)
        grid = self.tables.get(id(weight))
        if grid is not None and weight.numel() > UNFOLDED_SHARED_TRANSPOSE:
            # a tied head reading the table rows were gathered from: its transpose stays a
            # node, over the table's uint8, and the MatMul runs in float on that
            return func(x, fake_uint8_asymmetric(weight, grid), *rest, **kwargs)
        scale = self.smoothing.get(id(weight))
        if scale is not None:  # the smoothed model's Mul on the input, its scaled weight
            scale = scale.to(weight.device)
            x, weight = x * (1.0 / scale).to(x.dtype), weight * scale.to(weight.dtype)
        return func(self._input(x), fake_int8_symmetric(weight, axis=0), *rest, **kwargs)

    def _matmul(self, func, x, weight, *rest, **kwargs):  # noqa: ANN001
        if not self._constant(weight) or weight.dim() != 2:
            return func(x, weight, *rest, **kwargs)
        grid = self.tables.get(id(weight))
        if grid is not None:
            return func(self._input(x), fake_uint8_asymmetric(weight, grid), *rest, **kwargs)
        return func(self._input(x), fake_int8_symmetric(weight, axis=-1), *rest, **kwargs)

    def _addmm(self, func, bias, x, weight, *rest, **kwargs):  # noqa: ANN001
        if not self._constant(weight) or weight.dim() != 2:
            return func(bias, x, weight, *rest, **kwargs)
        return func(bias, self._input(x), fake_int8_symmetric(weight, axis=-1), *rest, **kwargs)

    def _embedding(self, func, weight, ids, rest, kwargs, weight_first: bool):  # noqa: ANN001
        out = func(weight, ids, *rest, **kwargs) if weight_first else func(
            ids, weight, *rest, **kwargs)
        return self._rows(weight, out) if self._constant(weight) else out

    def _rows(self, table: torch.Tensor, rows: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Return `rows` looked up from the constant `table` (`shared`: a tied table's, as
        `self.shared` are) on the table's grid: its 4-bit blocks when only the lookup reads
        it, else its uint8 grid, remembering both (the table itself is not
        rounded)."""
        if not shared and id(table) not in self.shared:
            return fake_uint4_blocks(rows)
        grid = self.tables.get(id(table))
        if grid is None:  # measured once a forward pass: the table does not change within one
            grid = self.tables[id(table)] = uint8_grid(table)
        out = fake_uint8_asymmetric(rows, grid)
        self.on_grid[id(out)] = out
        return out


class SimulatedInt8(nn.Module):
    """A graph module run under `Int8Simulation` of its own parameters and buffers, smoothed
    by `input_scales` (by weight name: `compressor.export.smoothing.input_scales`); it takes
    its inputs as the graph does (`compressor.runtime.outputs.call`)."""

    def __init__(self, module: fx.GraphModule,
                 input_scales: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module = module
        self._in_spec = getattr(module, "_in_spec", None)
        weights = dict(module.named_parameters(remove_duplicate=False))
        unknown = set(input_scales or {}) - set(weights)
        if unknown:
            raise ValueError(f"smoothing factors for weights the module does not hold: "
                             f"{sorted(unknown)[:3]}")
        self._smoothing = {id(weights[name]): scale
                           for name, scale in (input_scales or {}).items()}
        self._shared = _read_beyond_lookups(module)

    @property
    def graph(self) -> fx.Graph:
        """The simulated module's graph (its placeholders are the inputs)."""
        return self.module.graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        constants = [*self.module.parameters(), *self.module.buffers()]
        with Int8Simulation(constants, self._smoothing, self._shared):
            return self.module(*args, **kwargs)


def _read_beyond_lookups(module: nn.Module) -> list[torch.Tensor]:
    """Return the parameters and buffers of `module` that int8 keeps as a uint8 table for
    every reader (a tied table): those that go by more than one name (a tied LM head's table;
    a tied table's θ, read by its rows' module and its head's), and those the graph both looks
    rows up in and reads otherwise, unless that other reader is a Linear whose transposed
    weight the export folds into a copy of its own (a table of at most
    `UNFOLDED_SHARED_TRANSPOSE` numbers)."""
    tensors = [tensor for _, tensor in [*module.named_parameters(remove_duplicate=False),
                                        *module.named_buffers(remove_duplicate=False)]]
    names = Counter(id(tensor) for tensor in tensors)
    shared = list({id(t): t for t in tensors if names[id(t)] > 1}.values())
    if not isinstance(module, fx.GraphModule):
        return shared
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = attrgetter(node.target)(module)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            continue
        looked_up = [_looks_up(user, node) for user in node.users]
        folded = tensor.numel() <= UNFOLDED_SHARED_TRANSPOSE
        if any(looked_up) and any(
                not lookup and not (folded and _reads_as_linear_weight(user, node))
                for user, lookup in zip(node.users, looked_up, strict=True)):
            shared.append(tensor)
    return shared


def _looks_up(user: fx.Node, table: fx.Node) -> bool:
    """Whether graph node `user` looks rows up in `table` (an embedding)."""
    if user.op != "call_function":
        return False
    if user.target in _EMBEDDING_ATEN:
        return user.args[0] is table
    return user.target in _EMBEDDING_FUNCTIONAL and len(user.args) > 1 and user.args[1] is table


def _reads_as_linear_weight(user: fx.Node, weight: fx.Node) -> bool:
    return (user.op == "call_function" and user.target in _LINEAR and len(user.args) > 1
            and user.args[1] is weight)


def quantization_aware(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                       train_biases: bool, input_scales: dict[str, torch.Tensor] | None = None,
                       ) -> tuple[SimulatedInt8, list[nn.Parameter]]:
    """Return the student's compact form under `Int8Simulation` (smoothed by `input_scales`,
    by weight name in the compact form), and its parameters to train: the compact modules' θ
    (sharing storage with the student's), and their biases when `train_biases`, each once (a
    tied table's rows and its head are two modules reading one θ). Every other parameter is
    frozen."""
    compact = factorize(student, teacher, plan)
    for param in compact.parameters():
        param.requires_grad_(False)
    params: dict[int, nn.Parameter] = {}
    for name, module in compact.named_children():
        if not name.startswith(COMPACT_PREFIX):
            continue
        for key, param in module.named_parameters():
            if key != "bias" or train_biases:
                param.requires_grad_(True)
                params.setdefault(id(param), param)
    return SimulatedInt8(compact, input_scales), list(params.values())
