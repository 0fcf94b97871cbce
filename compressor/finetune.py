"""Fine-tune θ by distillation: make the compressed model's outputs match the original's.

Only θ (and optionally the biases) train, with AdamW under a warmup + cosine schedule, on CUDA
with bf16 autocast when there is one. The held-out split is scored every `eval_every` steps and
the best θ seen, the initialization included, is what the model keeps: fine-tuning never hands
back a model worse than the one it started from.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.passes import move_to_device_pass
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compressor.config import FinetuneConfig
from compressor.data import Dataset
from compressor.errors import ConfigError
from compressor.outputs import looks_like_logits, run_outputs
from compressor.planning import Plan
from compressor.progress import JobControl
from compressor.rewrite import trainable_parameters

_KL_TEMPERATURE = 2.0
# An evaluation this much worse than the best so far rolls θ back to the best and halves the lr.
_BACKOFF_MARGIN = 0.05


@dataclass
class FinetuneSummary:
    """What fine-tuning did: steps, device, and the held-out distillation loss over time."""

    steps: int
    device: str
    initial_score: float
    best_score: float
    best_step: int
    history: list[dict] = field(default_factory=list)


def resolve_device(choice: str) -> torch.device:
    """Return the device for `finetune.device` ('auto' picks CUDA when there is one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device is 'cuda' but no CUDA device is visible; "
                          "use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def device_copy(program: ExportedProgram, student: fx.GraphModule, plan: Plan,
                device: torch.device) -> fx.GraphModule:
    """Return the parametrized `student` rebuilt on `device` (device constants in the graph too)."""
    moved = move_to_device_pass(copy.deepcopy(program), device).module()
    for entry in plan.compressed:
        owner = student.get_submodule(entry.layer.name)
        clone = copy.deepcopy(owner.parametrizations.weight[0]).to(device)
        parametrize.register_parametrization(moved.get_submodule(entry.layer.name), "weight", clone)
    moved.load_state_dict(student.state_dict())
    trainable_parameters(moved, plan, train_biases=False)  # finetune_ widens it if asked
    return moved


def distillation_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Return Σ over float outputs of MSE / Var(target), plus a KL term on logits-like outputs."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for out, target in zip(outputs, targets, strict=True):
        if not target.is_floating_point():
            continue
        out, target = out.float(), target.float()
        total = total + F.mse_loss(out, target) / (target.var() + 1e-8)
        if looks_like_logits(target):
            total = total + F.kl_div(
                F.log_softmax(out / _KL_TEMPERATURE, dim=1),
                F.log_softmax(target / _KL_TEMPERATURE, dim=1),
                log_target=True, reduction="batchmean") * _KL_TEMPERATURE**2
    return total


def held_out_score(student: nn.Module, teacher_outputs: list[list[torch.Tensor]],
                   batches: list[dict[str, torch.Tensor]]) -> float:
    """Return the distillation loss of `student` on the held-out batches (sample-weighted).

    The same objective training minimizes: scoring with another one (say, relative L2 of the
    logits while training also fits their softmax) can reject every improvement.
    """
    total, rows = 0.0, 0
    with torch.no_grad():
        for batch, reference in zip(batches, teacher_outputs, strict=True):
            count = reference[0].shape[0]
            total += float(distillation_loss(run_outputs(student, batch), reference)) * count
            rows += count
    return total / max(1, rows)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def _schedule(config: FinetuneConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))
    return factor


def finetune_(student: nn.Module, teacher: nn.Module, plan: Plan, train: Dataset,
              held_out: Dataset, config: FinetuneConfig, control: JobControl,
              device: torch.device) -> FinetuneSummary:
    """Distill `teacher` into the parametrized `student` in place; keep the best θ seen.

    When a held-out evaluation comes out clearly worse than the best so far (the learning rate
    is too high for this model), θ goes back to the best state and the learning rate is halved.
    """
    params = trainable_parameters(student, plan, config.train_biases)
    eval_batches = [_to(b, device) for b in held_out.batches(max(64, config.batch_size))]
    with torch.no_grad():
        teacher_eval = [run_outputs(teacher, b) for b in eval_batches]
    best = held_out_score(student, teacher_eval, eval_batches)
    summary = FinetuneSummary(config.steps, str(device), best, best, 0)
    if config.steps == 0 or not params:
        return summary
    best_state = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lr_scale = 1.0
    schedule = _schedule(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_scale * schedule(s))
    generator = torch.Generator().manual_seed(config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(train), (min(config.batch_size, len(train)),),
                              generator=generator)
        batch = _to(train.take(index), device)
        with autocast:
            with torch.no_grad():
                targets = run_outputs(teacher, batch)
            loss = distillation_loss(run_outputs(student, batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            summary.history.append({"step": step, "loss": loss_value, "note": "diverged"})
            break
        if step % config.eval_every == 0 or step == config.steps:
            current = held_out_score(student, teacher_eval, eval_batches)
            entry = {"step": step, "loss": loss_value, "held_out": current}
            if current < best:
                best, summary.best_step = current, step
                best_state = [p.detach().clone() for p in params]
            elif current > best * (1 + _BACKOFF_MARGIN):
                _restore(params, best_state)
                optimizer.state.clear()
                lr_scale /= 2
                entry["backoff"] = f"rolled back to step {summary.best_step}, lr × {lr_scale:g}"
            summary.history.append(entry)
        control.report("finetuning", step / config.steps, f"step {step}/{config.steps}",
                       loss_value)
    _restore(params, best_state)
    summary.best_score = best
    return summary


def _restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, saved in zip(params, state, strict=True):
            param.copy_(saved)
