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

import torch
from torch import fx

from compressor.graph import layer_calls, layer_input, layer_rows
from compressor.planning import Plan
from compressor.rewrite import theta_of

# Relative damping of G' before it is solved against.
_DAMPING = 1e-3


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
        env[node] = self.interpreter.run_node(node)
        for done in self.freed.get(node, []):
            env.pop(done, None)


def _solve_second_factor(A: torch.Tensor, W: torch.Tensor, cross: torch.Tensor,
                         gram: torch.Tensor) -> torch.Tensor:
    """Return B = (AᵀA)⁻¹ Aᵀ W C (G' + λI)⁻¹ (see the module docstring), in float64."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    damped = gram + _DAMPING * gram.diagonal().mean().clamp(min=1e-12) * eye
    target = torch.linalg.solve(damped, cross.T @ W.T).T  # W C G'⁻¹, G' symmetric
    return torch.linalg.lstsq(A, target).solution


def correct_sequentially_(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                          batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Re-solve B of every lowrank Linear / Conv2d layer of `student` in graph order, in place.

    Returns, per corrected layer, its relative output error against the original on this
    batch before and after the correction (`{name: after / before}`).
    """
    targets = {p.layer.name: p.layer for p in plan.compressed
               if p.method.corrects_sequentially and p.layer.kind != "embedding"}
    if not targets:
        return {}
    names = [n.target for n in student.graph.nodes if n.op == "placeholder"]
    student_calls = layer_calls(student)
    teacher_stepper = _Stepper(teacher, iter([batch[n] for n in names]))
    student_stepper = _Stepper(student, iter([batch[n] for n in names]))
    gains: dict[str, float] = {}
    with torch.no_grad():
        for t_node, s_node in zip(teacher.graph.nodes, student.graph.nodes, strict=True):
            if s_node.op == "output":
                break
            name = student_calls.get(s_node)
            if name in targets:
                layer = targets[name]
                x = layer_rows(layer, teacher_stepper.value(layer_input(t_node)).double())
                x_student = layer_rows(layer, student_stepper.value(layer_input(s_node)).double())
                owner = student.get_submodule(name)
                A, B = theta_of(student, name)
                W = teacher.get_submodule(name).weight.detach().reshape(layer.out_features, -1)
                W = W.double()
                reference = x @ W.T
                before = (x_student @ (A.double() @ B.double()).T - reference).norm()
                corrected = _solve_second_factor(A.double(), W, x.T @ x_student,
                                                 x_student.T @ x_student)
                after = (x_student @ (A.double() @ corrected).T - reference).norm()
                if after < before:  # a worse fit (e.g. too few rows) keeps the old B
                    B.copy_(corrected.to(B.dtype))
                gains[name] = float(min(after, before) / before.clamp(min=1e-30))
                weight_node = s_node.args[1]
                student_stepper.interpreter.env[weight_node] = owner.weight
            teacher_stepper.step(t_node)
            student_stepper.step(s_node)
    return gains
