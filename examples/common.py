"""Shared pieces of the examples: seeded training, export with a dynamic batch, artifact files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim

Inputs = dict[str, torch.Tensor]

MAX_BATCH = 65536


@dataclass(frozen=True)
class ExampleArtifacts:
    """The files one example build wrote, and what it measured."""

    name: str
    program: Path  # <name>.pt2, a torch.export program with a dynamic batch dimension
    data: Path  # <name>-data.safetensors: training/calibration inputs, named like the inputs
    eval: Path  # <name>-eval.safetensors: held-out inputs only, feeds the model directly
    labels: Path  # <name>-labels.safetensors: one int64 `labels` tensor for the eval rows
    accuracy: float  # top-1 accuracy of the exported program on the eval rows
    num_classes: int
    train_seconds: float


def first_output(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Return the logits: the output itself, or the first of several outputs."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def take(inputs: Inputs, rows: torch.Tensor | slice) -> Inputs:
    """Return the same rows of every input tensor."""
    return {name: tensor[rows] for name, tensor in inputs.items()}


def train_classifier_(
    model: nn.Module,
    inputs: Inputs,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> float:
    """Train `model` in place with AdamW and cross-entropy; return the seconds it took."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for rows in order.split(batch_size):
            loss = nn.functional.cross_entropy(
                first_output(model(**take(inputs, rows))), labels[rows]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(
    model: nn.Module, inputs: Inputs, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Return the top-1 accuracy of `model` (its first output) on `inputs`."""
    predictions = [
        first_output(model(**take(inputs, slice(start, start + batch_size)))).argmax(-1)
        for start in range(0, len(labels), batch_size)
    ]
    return (torch.cat(predictions) == labels).float().mean().item()


def export_program(model: nn.Module, example: Inputs) -> torch.export.ExportedProgram:
    """Export `model` with every input's dim 0 as one shared dynamic `batch` dimension."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes = {name: {0: batch} for name in example}
    return torch.export.export(model.eval(), (), kwargs=example, dynamic_shapes=dynamic_shapes)


def write_artifacts(
    name: str,
    out_dir: Path,
    model: nn.Module,
    train_inputs: Inputs,
    eval_inputs: Inputs,
    eval_labels: torch.Tensor,
    *,
    num_classes: int,
    train_seconds: float,
) -> ExampleArtifacts:
    """Export `model`, write its program and data files, and measure the program's accuracy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    program = export_program(model, take(eval_inputs, slice(0, 8)))
    paths = {kind: out_dir / f"{name}-{kind}.safetensors" for kind in ("data", "eval", "labels")}
    torch.export.save(program, out_dir / f"{name}.pt2")
    save_file({k: v.contiguous() for k, v in train_inputs.items()}, paths["data"])
    save_file({k: v.contiguous() for k, v in eval_inputs.items()}, paths["eval"])
    save_file({"labels": eval_labels.contiguous()}, paths["labels"])
    return ExampleArtifacts(
        name=name,
        program=out_dir / f"{name}.pt2",
        data=paths["data"],
        eval=paths["eval"],
        labels=paths["labels"],
        accuracy=accuracy(program.module(), eval_inputs, eval_labels),
        num_classes=num_classes,
        train_seconds=train_seconds,
    )
