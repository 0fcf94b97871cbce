"""Re-solve each lowrank layer's second factor on the inputs the compressed model gives it.

Activation-aware initialization fits every layer to the inputs the ORIGINAL model feeds it. In
the compressed model, a layer's inputs come from the already compressed layers before it, so
they differ. `correct_sequentially_` runs the original and the compressed model side by side,
node by node, on one calibration batch; at each lowrank layer, with A fixed, it sets

    B = argmin ‖W X − A B X'‖  =  (AᵀA)⁻¹ Aᵀ W C (G' + λI)⁻¹,   C = X X'ᵀ, G' = X' X'ᵀ

(X: the original's inputs to the layer, X': the compressed model's), the closed-form least
squares update of SVD-LLM, so each layer also absorbs the error of the layers upstream. The
compressed model then carries on from the corrected layer. Embeddings read token ids, the same
in both models, and are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx

from compressor.graph import (
    add_product_,
    graph_inputs,
    layer_calls,
    layer_input,
    layer_rows,
    rows_layout,
)
from compressor.methods.base import LayerInfo
from compressor.planning import Plan
from compressor.rewrite import theta_of

# Relative damping of G' before it is solved against.
_DAMPING = 1e-3
# Rows of a layer's weight (and of A) taken to float64 at a time.
_ROWS_PER_CHUNK = 4096


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Return, for each node, the nodes whose last use it is (they may be freed after it)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for used in node.all_input_nodes:
            last[used] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for used, user in last.items():
        freed.setdefault(user, []).append(used)
    return freed


class _Stepper:
    """Run a GraphModule one node at a time, freeing values after their last use."""

    def __init__(self, module: fx.GraphModule, inputs: Iterator[torch.Tensor]) -> None:
        self.interpreter = fx.Interpreter(module)
        self.interpreter.env = {}
        self.interpreter.args_iter = inputs
        self.freed = _last_uses(module.graph)

    def value(self, node: fx.Node) -> torch.Tensor:
        return self.interpreter.env[node]

    def step(self, node: fx.Node) -> None:
        env = self.interpreter.env
        for used in node.all_input_nodes:  # weights not read yet are read now
            if used.op == "get_attr" and used not in env:
                env[used] = self.interpreter.run_node(used)
        env[node] = self.interpreter.run_node(node)
        for done in self.freed.get(node, []):
            env.pop(done, None)


def live_bytes(module: fx.GraphModule, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Run `module` on `batch` one node at a time, freeing each value after its last use; return
    the most bytes of intermediate tensors alive at once (weights not counted) and the bytes of
    its outputs."""
    stepper = _Stepper(module, iter(graph_inputs(module, batch)))
    weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}

    def held(values) -> int:
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                    for v in values if isinstance(v, torch.Tensor)}
        return sum(size for ptr, size in storages.items() if ptr not in weights)

    peak = 0
    with torch.no_grad():
        for node in module.graph.nodes:
            if node.op == "output":
                return peak, held(stepper.value(n) for n in node.all_input_nodes)
            stepper.step(node)
            peak = max(peak, held(stepper.interpreter.env.values()))
    return peak, 0


@dataclass
class _InputMoments:
    """The second moments of a layer's inputs in the original (X) and compressed (X') model,
    rows as samples: G = XᵀX, C = XᵀX', G' = X'ᵀX' (float64, in_features²)."""

    gram: torch.Tensor
    cross: torch.Tensor
    student_gram: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, x_student: torch.Tensor) -> _InputMoments:
        """Accumulate over chunks of rows (`graph.add_product_`): no float64 copy of the inputs."""
        width = x.shape[1]
        gram, cross, student_gram = (torch.zeros(width, width, dtype=torch.float64)
                                     for _ in range(3))
        return cls(add_product_(gram, x, x), add_product_(cross, x, x_student),
                   add_product_(student_gram, x_student, x_student))


@dataclass
class _LayerFit:
    """What the least-squares fit of B needs of a layer with A fixed, reduced to rank-sized
    matrices: AᵀA (r × r), AᵀW C (r × in) and ‖X Wᵀ‖² (float64). With them,

        ‖X' (A B)ᵀ − X Wᵀ‖² = ⟨AᵀA, B G' Bᵀ⟩ − 2 ⟨AᵀW C, B⟩ + ‖X Wᵀ‖²

    and the best B is (AᵀA)⁻¹ AᵀW C (G' + λI)⁻¹: no output-sized (out × in) float64 matrix is
    formed, only chunks of `_ROWS_PER_CHUNK` rows of W and A (a vocabulary-wide output layer's
    W alone is 200 MB in float64)."""

    gram_a: torch.Tensor
    target: torch.Tensor
    reference: torch.Tensor

    @classmethod
    def of(cls, A: torch.Tensor, W: torch.Tensor, moments: _InputMoments) -> _LayerFit:
        rank = A.shape[1]
        gram_a = torch.zeros(rank, rank, dtype=torch.float64)
        a_w = torch.zeros(rank, W.shape[1], dtype=torch.float64)
        reference = torch.zeros((), dtype=torch.float64)
        for start in range(0, W.shape[0], _ROWS_PER_CHUNK):
            a = A[start:start + _ROWS_PER_CHUNK].double()
            w = W[start:start + _ROWS_PER_CHUNK].double()
            gram_a += a.T @ a
            a_w += a.T @ w
            reference += ((w @ moments.gram) * w).sum()
        return cls(gram_a, a_w @ moments.cross, reference)

    def squared_error(self, B: torch.Tensor, moments: _InputMoments) -> torch.Tensor:
        """Return ‖X' (A B)ᵀ − X Wᵀ‖² (the layer's output error on the compressed model's
        inputs against the original's outputs)."""
        B = B.double()
        return ((self.gram_a * (B @ moments.student_gram @ B.T)).sum()
                - 2 * (self.target * B).sum() + self.reference)

    def best_second_factor(self, moments: _InputMoments) -> torch.Tensor:
        """Return B = (AᵀA)⁻¹ AᵀW C (G' + λI)⁻¹ (see the module docstring), in float64."""
        gram = moments.student_gram
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        damped = gram + _DAMPING * gram.diagonal().mean().clamp(min=1e-12) * eye
        right = torch.linalg.solve(damped, self.target.T).T  # AᵀW C G'⁻¹, G' symmetric
        return torch.linalg.lstsq(self.gram_a, right).solution


def correct_sequentially_(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                          batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Re-solve B of every lowrank Linear / Conv2d layer of `student` in graph order, in place.

    Returns, per corrected layer, its relative output error against the original on this
    batch before and after the correction (`{name: after / before}`). Both models run only up
    to the last corrected layer (a decoder's logits are never formed), and each layer's inputs
    are reduced to their second moments a chunk of rows at a time, shared by the layers that
    read the same inputs (q/k/v, gate/up).
    """
    targets = {p.layer.name: p.layer for p in plan.compressed
               if p.method.corrects_sequentially and p.layer.kind != "embedding"}
    if not targets:
        return {}
    student_calls = layer_calls(student)
    remaining = sum(1 for name in student_calls.values() if name in targets)
    teacher_stepper = _Stepper(teacher, iter(graph_inputs(teacher, batch)))
    student_stepper = _Stepper(student, iter(graph_inputs(student, batch)))
    gains: dict[str, float] = {}
    moments: dict[tuple[fx.Node, fx.Node, tuple], _InputMoments] = {}
    with torch.no_grad():
        # The two graphs hold the same nodes by name; only where weights are read may differ
        # (the student reads each where it is used, see `rewrite.sink_weight_reads_`): the
        # original reads them as its nodes need them.
        teacher_nodes = {node.name: node for node in teacher.graph.nodes}
        for s_node in student.graph.nodes:
            if s_node.op == "output":
                break
            t_node = teacher_nodes[s_node.name]
            name = student_calls.get(s_node)
            if name in targets:
                remaining -= 1
                layer = targets[name]
                key = (layer_input(t_node), layer_input(s_node), rows_layout(layer))
                if key not in moments:  # the first layer to read these inputs
                    moments.clear()
                    moments[key] = _InputMoments.of(
                        layer_rows(layer, teacher_stepper.value(key[0])),
                        layer_rows(layer, student_stepper.value(key[1])))
                gains[name] = _correct_layer(student, teacher, name, layer, moments[key])
                student_stepper.interpreter.env[s_node.args[1]] = student.get_submodule(
                    name).weight
                if remaining == 0:  # what follows the last corrected layer is never needed
                    break
            if t_node.op != "get_attr":
                teacher_stepper.step(t_node)
            student_stepper.step(s_node)
    return gains


def _correct_layer(student: fx.GraphModule, teacher: fx.GraphModule, name: str,
                   layer: LayerInfo, moments: _InputMoments) -> float:
    """Re-solve the layer's B on `moments` unless that fits worse; return after / before."""
    A, B = theta_of(student, name)
    W = teacher.get_submodule(name).weight.detach().reshape(layer.out_features, -1)
    fit = _LayerFit.of(A.detach(), W, moments)
    before = fit.squared_error(B, moments).clamp(min=0).sqrt()
    corrected = fit.best_second_factor(moments)
    after = fit.squared_error(corrected, moments).clamp(min=0).sqrt()
    if after < before:  # a worse fit (e.g. too few rows) keeps the old B
        B.copy_(corrected.to(B.dtype))
    return float(min(after, before) / before.clamp(min=1e-30))
