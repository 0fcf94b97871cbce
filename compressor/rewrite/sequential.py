"""Correct each layer on the inputs the compressed model gives it, in graph order.

Initialization fits every layer to the inputs the ORIGINAL model feeds it. In the compressed
model, a layer's inputs come from the already compressed layers before it, so they differ.
`correct_sequentially_` runs the original and the compressed model side by side, node by node,
on one calibration batch; at each layer whose method corrects sequentially it reduces both
models' inputs to that layer to their second moments (`InputMoments`) and lets the method
re-solve θ on them (`Method.correct_`: lowrank re-solves B in closed form), so each layer also
absorbs the error of the layers upstream. The compressed model then carries on from the
corrected layer. A kind that reads rows by index (an embedding) reads token ids, the same in
both models, and is left as it is.
"""

from __future__ import annotations

import torch
from torch import fx

from compressor.plan.layers import layer_calls, layer_input
from compressor.plan.planning import LayerPlan, Plan
from compressor.rewrite.parametrize import theta_of
from compressor.runtime.graph import GraphStepper
from compressor.runtime.layers import InputMoments, layer_weight, rows_layout


def correct_sequentially_(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                          batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Correct θ of every layer of `student` whose method corrects sequentially, in graph
    order, in place.

    Returns, per corrected layer, its relative output error against the original on this
    batch before and after the correction (`{name: after / before}`). Both models run only up
    to the last corrected layer (a decoder's logits are never formed), and each layer's inputs
    are reduced to their second moments a chunk of rows at a time, shared by the layers that
    read the same inputs (q/k/v, gate/up).
    """
    targets: dict[str, LayerPlan] = {p.layer.name: p for p in plan.compressed
                                     if p.method.corrects_sequentially
                                     and not p.layer.spec.reads_rows}
    if not targets:
        return {}
    student_calls = layer_calls(student)
    remaining = sum(1 for name in student_calls.values() if name in targets)
    teacher_stepper = GraphStepper(teacher, batch)
    student_stepper = GraphStepper(student, batch)
    gains: dict[str, float] = {}
    moments: dict[tuple[fx.Node, fx.Node, tuple], InputMoments] = {}
    with torch.no_grad():
        # The two graphs hold the same nodes by name; only where weights are read may differ
        # (the student reads each where it is used, see `rewrite.sink_weight_reads_`): the
        # original reads them as its nodes need them.
        teacher_nodes = {node.name: node for node in teacher.graph.nodes}
        for s_node in student_stepper.nodes():
            t_node = teacher_nodes[s_node.name]
            name = student_calls.get(s_node)
            if name in targets:
                remaining -= 1
                entry = targets[name]
                layer = entry.layer
                key = (layer_input(t_node), layer_input(s_node), rows_layout(layer))
                if key not in moments:  # the first layer to read these inputs
                    moments.clear()
                    moments[key] = InputMoments.of(
                        layer.spec.input_rows(layer, teacher_stepper.value(key[0])),
                        layer.spec.input_rows(layer, student_stepper.value(key[1])))
                weight = layer_weight(teacher, layer).detach()
                gains[name] = entry.method.correct_(
                    layer, theta_of(student, name), weight.reshape(layer.out_features, -1),
                    moments[key])
                # The graph reads the stored tensor (W, or its transpose).
                student_stepper.env[s_node.args[layer.spec.weight_arg]] = student.get_submodule(name).weight
                if remaining == 0:  # what follows the last corrected layer is never needed
                    break
            if t_node.op != "get_attr":
                teacher_stepper.step(t_node)
            student_stepper.step(s_node)
    return gains
