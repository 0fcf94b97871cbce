"""Correct each layer on the inputs the compressed model gives it, in graph order.

Initialization fits every layer to the inputs the ORIGINAL model feeds it. In the compressed
model, a layer's inputs come from the already compressed layers before it, so they differ.
`correct_sequentially_` runs the original and the compressed model side by side, node by node,
on calibration batches in lockstep; at each layer whose method corrects sequentially it reduces
both models' inputs to that layer to their second moments (`InputMoments`) and lets the method
re-solve θ on them (`Method.correct_`: lowrank re-solves B in closed form), so each layer also
absorbs the error of the layers upstream. The compressed model then carries on from the
corrected layer. A kind that reads rows by index (an embedding) reads token ids, the same in
both models, and is left as it is; so is a tied head (an LM's output layer whose table is its
input embedding): its refit would change the rows every layer upstream was corrected on.

A closed-form refit on few tokens fits them, not the layer: with 128 tokens a 2048-wide layer's
input Gram is rank 128, and the refit that is exact on them can be worse everywhere else. So the
batches are split: the refit is made on the fitting batches and judged on the checking ones
(tokens it was not fitted on), and a layer keeps it only when it fits those better; the kept
refit is then made again on all of them.
"""

from __future__ import annotations

import torch
from torch import fx

from compressor.plan.layers import layer_calls, layer_input
from compressor.plan.planning import LayerPlan, Plan
from compressor.rewrite.parametrize import theta_of
from compressor.runtime.graph import GraphStepper, last_uses, live_bytes, run_node
from compressor.runtime.layers import InputMoments, layer_weight, rows_layout

# One batch in this many checks the refit of every layer instead of fitting it.
CHECK_EVERY = 4
# The correction's samples are run as this many batches, at most (in lockstep).
BATCHES = 8


def correct_sequentially_(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                          batches: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor],
                          ) -> dict[str, float]:
    """Correct θ of every layer of `student` whose method corrects sequentially, in graph
    order, in place, on `batches` (one batch, or several run in lockstep: each batch's values
    are kept only as long as the graph still needs them).

    With two batches or more, every `CHECK_EVERY`-th (at least one) checks each refit instead
    of fitting it (see the module docstring). Returns, per corrected layer, its relative output
    error against the original before and after the correction (`{name: after / before}`), on
    the checking batches when there are any. Both models run only up to the last corrected
    layer (a decoder's logits are never formed), and each layer's inputs are reduced to their
    second moments a chunk of rows at a time, shared by the layers that read the same inputs
    (q/k/v, gate/up).
    """
    if isinstance(batches, dict):
        batches = [batches]
    targets: dict[str, LayerPlan] = {p.layer.name: p for p in plan.compressed
                                     if p.method.corrects_sequentially
                                     and not p.layer.spec.reads_rows
                                     and not p.layer.tied_embedding}
    last = _last_call(student, targets)
    if last is None or not batches:
        return {}
    checking = checking_batches(len(batches))
    student_calls = layer_calls(student)
    remaining = sum(1 for name in student_calls.values() if name in targets)
    # Neither model runs the last corrected layer or anything after it: a value is freed after
    # its last use before it (a tied table the head reads again is not held for the head).
    teacher_nodes = {node.name: node for node in teacher.graph.nodes}
    student_freed = last_uses(student.graph, last)
    teacher_freed = last_uses(teacher.graph, teacher_nodes[last.name])
    pairs = [(GraphStepper(teacher, batch, freed=teacher_freed),
              GraphStepper(student, batch, freed=student_freed)) for batch in batches]
    gains: dict[str, float] = {}
    moments: dict[tuple, tuple[InputMoments, InputMoments | None]] = {}
    with torch.no_grad():
        # The two graphs hold the same nodes by name; only where weights are read may differ
        # (the student reads each where it is used, see `rewrite.sink_weight_reads_`): the
        # original reads them as its nodes need them.
        for s_node in student.graph.nodes:
            if s_node.op == "output":
                break
            t_node = teacher_nodes[s_node.name]
            name = student_calls.get(s_node)
            if name in targets:
                remaining -= 1
                layer = targets[name].layer
                key = (layer_input(t_node).name, layer_input(s_node).name, rows_layout(layer))
                if key not in moments:  # the first layer to read these inputs
                    moments.clear()
                    moments[key] = _moments(pairs, layer, layer_input(t_node),
                                            layer_input(s_node), checking)
                fit, check = moments[key]
                weight = layer_weight(teacher, layer).detach()
                gains[name] = targets[name].method.correct_(
                    layer, theta_of(student, name), weight.reshape(layer.out_features, -1), fit,
                    check)
                # The graph reads the stored tensor (W, or its transpose).
                stored = student.get_submodule(name).weight
                for _, student_stepper in pairs:
                    student_stepper.env[s_node.args[layer.spec.weight_arg]] = stored
                if remaining == 0:  # what follows the last corrected layer is never needed
                    break
            _read_weights_once(student, s_node, [stepper for _, stepper in pairs])
            if s_node.op == "get_attr":  # read once above, for every batch
                continue
            for teacher_stepper, student_stepper in pairs:
                teacher_stepper.step(t_node)
                student_stepper.step(s_node)
    return gains


def correction_batches(dataset, samples: int) -> list[dict[str, torch.Tensor]]:
    """Return the first `samples` of `dataset` as up to `BATCHES` batches of near-equal size."""
    count = max(1, min(samples, BATCHES))
    return [dataset.take(part) for part in torch.arange(samples).tensor_split(count)]


def correction_bytes_per_sample(teacher: fx.GraphModule, plan: Plan,
                                sample: dict[str, torch.Tensor]) -> int:
    """Return the most bytes one sample's activations hold in the original up to the last
    layer the correction reaches (measured on `sample`): what each model holds per sample."""
    targets = {p.layer.name: p for p in plan.compressed if p.method.corrects_sequentially
               and not p.layer.spec.reads_rows and not p.layer.tied_embedding}
    return live_bytes(teacher, sample, stop_before=_last_call(teacher, targets))[0]


def _last_call(module: fx.GraphModule, targets: dict[str, LayerPlan]) -> fx.Node | None:
    """Return the last node of `module`'s graph that calls one of the `targets` layers."""
    calls = [node for node, name in layer_calls(module).items() if name in targets]
    order = {node: i for i, node in enumerate(module.graph.nodes)}
    return max(calls, key=order.__getitem__, default=None)


def _read_weights_once(student: fx.GraphModule, node: fx.Node,
                       steppers: list[GraphStepper]) -> None:
    """Compute each weight `node` is or reads that no stepper has read yet once, for all of
    them: a parametrized weight is W = f(θ), a new tensor at every read (a tied vocabulary
    table's product is as large as the table), not to be made and held again for every batch."""
    env = steppers[0].env
    for used in (node, *node.all_input_nodes):
        if used.op == "get_attr" and used not in env:
            value = run_node(student, used, env)
            for stepper in steppers:
                stepper.env[used] = value


def checking_batches(batches: int) -> set[int]:
    """The batches that check the refits: every `CHECK_EVERY`-th, counted from the last, and
    none when there is only one batch."""
    if batches < 2:
        return set()
    return set(range(batches - 1, -1, -CHECK_EVERY))


def _moments(pairs: list[tuple[GraphStepper, GraphStepper]], layer, teacher_input: fx.Node,
             student_input: fx.Node, checking: set[int],
             ) -> tuple[InputMoments, InputMoments | None]:
    """Return the layer's input moments summed over the fitting batches, and over the checking
    ones (None when none checks)."""
    fit: InputMoments | None = None
    check: InputMoments | None = None
    for index, (teacher_stepper, student_stepper) in enumerate(pairs):
        part = InputMoments.of(layer.spec.input_rows(layer, teacher_stepper.value(teacher_input)),
                               layer.spec.input_rows(layer, student_stepper.value(student_input)))
        if index in checking:
            check = part if check is None else check.add_(part)
        else:
            fit = part if fit is None else fit.add_(part)
    assert fit is not None  # at least one batch fits: `_checking` keeps the first
    return fit, check
