"""Block-wise distillation: each repeated block learns the original's block, on its inputs.

End to end, a step runs the student's whole model, head included, and backpropagates from its
outputs: for a language model with a large vocabulary the head is most of that work (Gemma-3
270M's 262,144 × 640 head is about 60 % of a step's FLOPs on a CPU). Block-wise, a step runs
the original's graph without gradients up to the end of its last repeated block (`layers.0`,
`layers.1`, ...: `activation_checkpointing.segments`), keeping what enters and leaves each
block; then each of the student's blocks runs on the original's inputs to that block, and its
loss is the squared error of its outputs relative to the original block's. Each block's loss is
backpropagated on its own (its inputs are constants), so a step holds one block's activations
at a time, and no logits are ever formed.

Only the layers inside blocks learn: a table, a head or any layer outside every block keeps θ
as initialized. The held-out score that picks the best θ stays the model's outputs', end to
end.
"""

from __future__ import annotations

import torch
from torch import fx

from compressor.finetune.activation_checkpointing import Segment, segments
from compressor.runtime.graph import GraphStepper, last_uses, run_node


class BlockwiseLoss:
    """The block-wise distillation loss of `student` (an fx graph module made from `teacher`'s,
    node for node, as `build_student` makes it) on a batch, each block's loss backpropagated
    as it is computed."""

    def __init__(self, student: fx.GraphModule, teacher: fx.GraphModule) -> None:
        self.student, self.teacher = student, teacher
        # a run of weight reads alone (where the graph reads weights ahead) computes nothing
        self.segments = [s for s in segments(student.graph)
                         if s.block and any(node.op != "get_attr" for node in s.nodes)]
        self.blocks = len({s.block for s in self.segments})
        originals = {node.name: node for node in teacher.graph.nodes}
        boundary = {node for s in self.segments for node in (*s.inputs, *s.outputs)
                    if node.op != "get_attr"}  # weights are read from the student
        missing = sorted(node.name for node in boundary if node.name not in originals)
        if missing:
            raise ValueError(f"the student's graph has nodes the original's lacks: {missing}")
        # the original's values read: what enters and leaves each block
        self._original = {node: originals[node.name] for node in boundary}
        self._last = originals[self.segments[-1].nodes[-1].name] if self.segments else None
        self._student_freed = last_uses(student.graph)
        self._teacher_freed = last_uses(teacher.graph)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backpropagate every block's loss on `batch`; return their sum, detached."""
        values = self._original_values(batch)
        total = torch.zeros(())
        for segment in self.segments:
            loss = self._segment_loss(segment, values)
            if loss is None:
                continue
            if loss.requires_grad:  # a block with nothing to train has nothing to backpropagate
                loss.backward()
            total = total + loss.detach().float().cpu()
        return total

    def _original_values(self, batch: dict[str, torch.Tensor]) -> dict[fx.Node, object]:
        """Run the original up to the end of its last block; return the values at the blocks'
        boundaries, by the student's node."""
        wanted = set(self._original.values())
        stepper = GraphStepper(self.teacher, batch, keep=wanted, freed=self._teacher_freed)
        with torch.no_grad():
            for _ in stepper.steps_through([self._last]):
                pass
        found = {mine: stepper.value(theirs) for mine, theirs in self._original.items()}
        stepper.clear()
        return found

    def _segment_loss(self, segment: Segment, values: dict[fx.Node, object],
                      ) -> torch.Tensor | None:
        """Return the student's block `segment`, run on the original's inputs to it: Σ over its
        floating-point outputs of |student − original|² / |original|² (None: no such output)."""
        env: dict[fx.Node, object] = {}
        for node in segment.inputs:
            # a weight read first outside the block is the student's own, not the original's
            env[node] = (run_node(self.student, node, env) if node.op == "get_attr"
                         else values[node])
        stepper = GraphStepper(self.student, env=env, keep=set(segment.outputs),
                               freed=self._student_freed)
        for node in segment.nodes:
            stepper.step(node)
        loss = None
        for node in segment.outputs:
            if node.op == "get_attr":
                continue
            mine, original = stepper.value(node), values[node]
            if not (isinstance(mine, torch.Tensor) and mine.is_floating_point()):
                continue
            error = (mine.float() - original.float()).pow(2).sum()
            term = error / original.float().pow(2).sum().clamp_min(1e-12)
            loss = term if loss is None else loss + term
        stepper.clear()
        return loss
