"""Where fine-tuning runs: the CPU, or a CUDA device that holds the model once.

On CUDA, teacher and student are copied to the device together, sharing there every tensor
they share on the host; only θ and the student's own tensors come back (`copy_back_`).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import fx, nn

from compressor.config import FinetuneConfig
from compressor.errors import ConfigError
from compressor.finetune.checkpoints import FinetuneCheckpoints
from compressor.finetune.loop import Distillation, FinetuneSummary, finetune_
from compressor.plan.planning import Plan
from compressor.runtime.progress import JobControl


def finetune_on_device_(student: fx.GraphModule, plan: Plan, lesson: Distillation,
                        config: FinetuneConfig, control: JobControl,
                        initial_score: float,
                        checkpoints: FinetuneCheckpoints | None = None) -> FinetuneSummary:
    """Fine-tune `student` in place, on CUDA when `config.device` picks it (θ is copied there
    and back). `initial_score` is the student's held-out score before fine-tuning;
    `checkpoints`, where the run keeps its checkpoints (None: nowhere)."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        return finetune_(student, plan, lesson, config, control, device, initial_score,
                         checkpoints)
    teacher_on_device, student_on_device = on_device(lesson.teacher, student, device)
    enough = lesson.enough
    if enough is not None and enough.shipped is not None:
        shipped = enough.shipped

        def shipped_as_trained() -> bool:
            # the check reads `student`: θ as the copy on the device has it now
            copy_back_(student, lesson.teacher, student_on_device)
            return shipped()

        enough = replace(enough, shipped=shipped_as_trained)
    on_device_lesson = Distillation(teacher_on_device, lesson.kinds, lesson.train,
                                    lesson.held_out.to(device), enough,
                                    lesson.int8_input_scales, lesson.scoring_s,
                                    lesson.language_model)
    summary = finetune_(student_on_device, plan, on_device_lesson, config, control, device,
                        initial_score, checkpoints)
    copy_back_(student, lesson.teacher, student_on_device)
    return summary


def resolve_device(choice: str) -> torch.device:
    """Return the device for `finetune.device` ('auto' picks CUDA when there is one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device is 'cuda' but no CUDA device is visible; "
                          "use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def on_device(teacher: fx.GraphModule, student: fx.GraphModule, device: torch.device,
              ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Return copies of `teacher` and the parametrized `student` on `device`.

    Every tensor the two share here (all but θ and the compressed layers' biases) is moved once
    and shared there too, so the device holds the model once, and nothing is copied on the host.
    The graphs' device constants (a `device=` argument, `aten.to.device`) are pointed at
    `device`, as `torch.export.passes.move_to_device_pass` does for a program.
    """
    moved: dict[int, torch.Tensor] = {}
    for module in (teacher, student):
        for tensor in _tensors(module):
            if id(tensor) not in moved:
                moved[id(tensor)] = _moved(tensor, device)
    copies = []
    for module in (teacher, student):
        clone = copy.deepcopy(module, dict(moved))
        _point_graph_at_(clone, device)
        copies.append(clone)
    return copies[0], copies[1]


def copy_back_(student: nn.Module, teacher: nn.Module, trained: nn.Module) -> None:
    """Copy into `student` its own tensors (θ, its biases) from `trained`, its device copy."""
    shared = {id(tensor) for tensor in _tensors(teacher)}
    state = trained.state_dict()
    with torch.no_grad():
        for name, tensor in student.state_dict(keep_vars=True).items():
            if id(tensor) not in shared:
                tensor.copy_(state[name])


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Return every tensor `module` holds: parameters, buffers and plain tensor attributes."""
    found = []
    for submodule in module.modules():
        found.extend(submodule._parameters.values())
        found.extend(submodule._buffers.values())
        found.extend(v for v in vars(submodule).values() if isinstance(v, torch.Tensor))
    return [tensor for tensor in found if tensor is not None]


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    copied = tensor.detach().to(device, copy=True)  # a copy even on the same device
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copied, tensor.requires_grad)
    return copied


def _point_graph_at_(module: fx.GraphModule, device: torch.device) -> None:
    for node in module.graph.nodes:
        if "device" in node.kwargs:
            node.kwargs = {**node.kwargs, "device": device}
        if node.op == "call_function" and node.target is torch.ops.aten.to.device:
            node.args = (node.args[0], device, *node.args[2:])
    module.recompile()
