"""Fine-tune θ by distillation: make the compressed model's outputs match the original's.

Only θ (and optionally the biases) train, with AdamW under a warmup + cosine schedule, on CUDA
with bf16 autocast when there is one, and with the model's blocks under activation checkpointing
when a step's activations would not fit (`compressor.finetune.activation_checkpointing`). The
loss is backpropagated a chunk of rows at a time then, and whenever an output is larger than
a chunk (a language model's logits), so its softmaxes over the vocabulary and their gradients
are never all held at once. With `finetune.distill: blocks`, a step compares each repeated
block's outputs with the original's instead (`compressor.finetune.blockwise`): no logits are
formed. The held-out split is scored every `eval_every` steps and
the best θ seen, the initialization included, is what the model keeps: fine-tuning never hands
back a model worse than the one it started from. A lesson with a `FloorCheck` (target mode)
ends at the first evaluation whose held-out fidelity keeps the floor: the steps left would buy
margin the job did not ask for, at the time it did.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from compressor.config import FinetuneConfig
from compressor.errors import InterruptedJobError, ResourceError
from compressor.finetune.activation_checkpointing import (
    BlockCheckpointing,
    saved_activation_bytes,
    wanted,
)
from compressor.finetune.blockwise import BlockwiseLoss
from compressor.finetune.checkpoints import FinetuneCheckpoints, TrainingState
from compressor.finetune.quantization_aware import quantization_aware
from compressor.finetune.teacher_targets import TeacherTargets, next_draw, sampled_indices
from compressor.load.data import Dataset
from compressor.plan.planning import Plan
from compressor.rewrite.parametrize import trainable_parameters
from compressor.runtime.memory import available_memory_bytes, format_bytes
from compressor.runtime.objectives import (
    Target,
    distillation_backward,
    distillation_loss,
    larger_than_a_chunk,
)
from compressor.runtime.outputs import FidelityMeter, OutputFidelity, run_outputs
from compressor.runtime.progress import JobControl
from compressor.runtime.resume import free_disk_bytes
from compressor.runtime.spill import SpilledTensors
from compressor.runtime.top_logits import TopKOutputs, kept_k, target_bytes

# An evaluation this much worse than the best so far rolls θ back to the best and halves the lr.
_BACKOFF_MARGIN = 0.05
# The original's outputs on the whole training split are computed once when they fit in this.
_TEACHER_CACHE_BYTES = 512 * 1024**2
# The original's held-out outputs are held in memory up to this many bytes; past it, when the
# training targets are their top k (a language model's logits: 128 MiB a 128-token window of
# Gemma-3's), they go to disk a batch at a time (`HeldOut.of`'s `spill`).
_HELD_OUT_MEMORY_BYTES = 512 * 1024**2
# Tensors the size of θ that training adds: gradients, AdamW's two moments, the best θ.
_TRAINING_COPIES = 4
# A step's outputs are held about this many times over: the student's, the original's, the
# gradient of the student's, and a chunk of the loss's softmaxes (at most their size).
_OUTPUT_COPIES = 4
# `finetune.tokens_per_step: "auto"` on the CPU: a step of a 135M language model on this many
# tokens takes seconds there, so a few hundred steps fit in an hour.
_CPU_TOKENS_PER_STEP = 1024
# `finetune.relative_lr: "auto"`: each θ tensor's peak learning rate over its RMS, and that of a
# causal language model's (at 0.005, Gemma-3 270M's held-out loss went from 0.131 to 0.272 in
# 25 steps of 256 tokens; at a sixteenth of it, 0.131 to 0.091).
RELATIVE_LR = 0.005
LANGUAGE_MODEL_RELATIVE_LR = 0.0003
# Training plans on this share of the free memory; the rest is for the allocator's slack.
_TRAINING_FREE_SHARE = 0.9
_CPU = torch.device("cpu")
# The held-out history's note where a lesson's floor was kept and fine-tuning ended.
FLOOR_KEPT = "floor kept: fine-tuning ends here"


@dataclass
class FinetuneSummary:
    """What fine-tuning did: steps, device, and the held-out distillation loss over time."""

    steps: int
    device: str
    initial_score: float
    best_score: float
    best_step: int
    history: list[dict] = field(default_factory=list)
    # Whether the blocks ran under activation checkpointing, and what a step keeps without it
    # (measured on one sample, times the batch size; None when not measured).
    activation_checkpointing: bool = False
    activation_bytes_per_step: int | None = None
    # What a step holds beyond θ's copies, as run (with checkpointing: one block's activations
    # and the blocks' inputs, estimated as 2 / blocks of a plain step's), plus 4 × its outputs
    # (the student's, the original's, their gradient, the loss's softmaxes); None: not measured.
    step_bytes: int | None = None
    # Whether the original's outputs on the training split were kept (small enough), each
    # sample's made once, when a step first drew it; and on how many samples they were made.
    teacher_outputs_cached: bool = False
    teacher_samples: int = 0
    # Why no step ran although some were asked for (the memory they need is not free), or None.
    skipped: str | None = None
    # Whether θ trained through onnxruntime's int8 arithmetic, simulated (the losses and
    # held-out scores are then the simulated int8 model's).
    quantization_aware: bool = False
    # Samples a step trains on (`batch_size`, or fewer to keep to `tokens_per_step`), and
    # the tokens they hold when the inputs are text (None: not text).
    samples_per_step: int = 0
    tokens_per_step: int | None = None
    # The k of the original's most likely next tokens a language model's logits were
    # distilled on (None: every output whole; `compressor.runtime.top_logits`).
    logits_top_k: int | None = None
    # The step a kept checkpoint let this run go on after (None: it started from step 1).
    resumed_at_step: int | None = None
    # The last step θ took (`steps` when none was cut; fewer when the time budget, a
    # divergence or a lack of memory stopped it), and why the budget stopped it, or None.
    steps_run: int = 0
    cut_by_budget: str | None = None
    # The evaluation step at which the held-out fidelity kept the floor and fine-tuning ended
    # (`Distillation.enough`), or None.
    floor_kept_at: int | None = None
    # How many repeated blocks each step distilled block-wise (`finetune.distill: blocks`;
    # 0: the model's outputs), and why the outputs were distilled when blocks were asked for.
    blocks_distilled: int = 0
    distill_note: str | None = None
    # Each θ tensor's peak learning rate over its RMS (`finetune.relative_lr`), or None when
    # `finetune.lr` set one rate for all.
    relative_lr: float | None = None
    # The step the learning rate's cosine ends at: `steps`, or, under a time budget, the last
    # step the budget affords at the pace so far (updated every step), so a run the budget
    # cuts still ends at a small learning rate.
    schedule_steps: int = 0


@dataclass
class HeldOut:
    """The held-out split, scored a batch of `batch_size` at a time, with the original's
    outputs on each of its batches (`reference`, computed once: in memory, or on disk a batch at
    a time), and what the distillation loss compares with (`targets`: the same outputs, or the
    top k of those `top_k` names)."""

    data: Dataset
    batch_size: int
    reference: Sequence[list[torch.Tensor]]
    targets: Sequence[list[Target]]
    top_k: TopKOutputs | None = None

    @classmethod
    def of(cls, teacher: nn.Module, data: Dataset, batch_size: int,
           top_k: TopKOutputs | None = None, spill: Path | None = None,
           for_training: bool = True) -> HeldOut:
        """Run the original on every held-out batch once.

        With `spill` (a folder), outputs whose whole would take more than
        `_HELD_OUT_MEMORY_BYTES` are written there a batch at a time instead of held, where
        nothing reads them whole a step at a time: training keeps only their top k (`top_k`),
        or they are only scored against (not `for_training`: target mode's search). The
        fidelity figures read them back one batch at a time.
        """
        batches = list(data.batches(batch_size))
        reference: list[list[torch.Tensor]] | SpilledTensors = []
        targets: list[list[Target]] = []
        with torch.no_grad():
            for batch in batches:
                outputs = run_outputs(teacher, batch)
                compact = outputs if top_k is None else top_k.compact(outputs)
                if (spill is not None and not reference
                        and _spilled(outputs, compact, batches, for_training)):
                    _check_disk_for(spill, target_bytes(outputs) * len(batches), batch_size)
                    reference = SpilledTensors(spill)
                reference.append(outputs)
                if top_k is not None:
                    targets.append(compact)
                del outputs, compact
        if top_k is None:
            targets = reference
        return cls(data, batch_size, reference, targets, top_k)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """Return the held-out batches, in the order of `reference`."""
        return list(self.data.batches(self.batch_size))

    def compact(self, outputs: list[torch.Tensor]) -> list[Target]:
        """Return the training targets for the original's `outputs` (as `targets` are made)."""
        return outputs if self.top_k is None else self.top_k.compact(outputs)

    def to(self, device: torch.device) -> HeldOut:
        """Return the same split with the original's outputs on `device` (outputs on disk are
        read back onto it)."""
        reference = (self.reference.on(device) if isinstance(self.reference, SpilledTensors)
                     else [[t.to(device) for t in batch] for batch in self.reference])
        targets = (reference if self.targets is self.reference
                   else [[t.to(device) for t in batch] for batch in self.targets])
        return HeldOut(self.data, self.batch_size, reference, targets, self.top_k)


def _spilled(outputs: list[torch.Tensor], targets: list[Target], batches: list,
             for_training: bool) -> bool:
    """Whether the original's held-out outputs go to disk, judged on the first batch's: all
    `batches` of them would take more than `_HELD_OUT_MEMORY_BYTES` held whole, and training
    does not read them (not `for_training`) or needs only their top k (`targets` are
    smaller)."""
    whole = target_bytes(outputs)
    return ((not for_training or target_bytes(targets) < whole)
            and whole * len(batches) > _HELD_OUT_MEMORY_BYTES)


def _check_disk_for(spill: Path, needed: int, batch_size: int) -> None:
    """Refuse, before the first is written, held-out outputs the disk at `spill` cannot take
    (`needed` bytes: the first batch's times the batches), rather than fill it up halfway."""
    free = free_disk_bytes(spill)
    if free is not None and needed > free:
        raise ResourceError(
            f"the original's outputs on the held-out split take about {format_bytes(needed)} "
            f"on disk (a language model's logits, {batch_size} samples a batch) and the disk "
            f"of {spill} has {format_bytes(free)} free: free space there, give the job "
            "a folder on a larger disk, or hold out less text (data.holdout_fraction, "
            "data.max_samples)")


@dataclass(frozen=True)
class FloorCheck:
    """When fine-tuning has done enough: at a held-out evaluation that is the best so far, the
    student's fidelity there (`FidelityMeter`, `next_token` marking a language model's logits)
    is what `kept` accepts (target mode: the floor, with the margin quantization will take),
    and then `shipped`, when given, says that what ships keeps it too (target mode: the real
    quantized model, exported from θ as it is on the student the lesson was given); or, with
    `kept_as_initialized`, at the first evaluation when no step improved on θ as initialized."""

    next_token: list[bool] | None
    kept: Callable[[list[OutputFidelity]], bool]
    shipped: Callable[[], bool] | None = None
    # θ as initialized keeps the floor already (target mode: a finalist that met it as
    # scored): fine-tuning ends at its first evaluation, with whichever θ scored best there
    kept_as_initialized: bool = False


@dataclass
class Distillation:
    """What the student learns from: the original (`teacher`), each output's kind (hence its
    loss, `compressor.runtime.objectives`), the training split, and the held-out split with the
    original's outputs on it; with `enough`, when it has learned enough (None: every step);
    with `int8_input_scales`, the smoothing a quantization-aware run simulates int8 with
    (`compressor.finetune.quantization_aware`); `scoring_s`, the seconds a held-out scoring
    pass took before fine-tuning (0: not measured), which a time budget keeps for the one
    taken where it stops fine-tuning, and for the scoring of the best θ after."""

    teacher: nn.Module
    kinds: list[str]
    train: Dataset
    held_out: HeldOut
    enough: FloorCheck | None = None
    int8_input_scales: dict[str, torch.Tensor] | None = None
    scoring_s: float = 0.0
    # Whether an output is a causal language model's next-token logits (the learning rate
    # `finetune.relative_lr: auto` picks).
    language_model: bool = False


def held_out_score(student: nn.Module | None, held_out: HeldOut, kinds: list[str],
                   meter: FidelityMeter | None = None,
                   batches: list[dict[str, torch.Tensor]] | None = None) -> float:
    """Return the distillation loss of `student` on the held-out batches (sample-weighted).

    The same objective training minimizes: scoring with another one (say, relative L2 of the
    logits while training also fits their softmax) can reject every improvement. `meter`, when
    given, is fed the same outputs and batches (fidelity from the same pass). `batches` may give
    the held-out batches already on the student's device. `student` None scores the original
    itself: its outputs are the held-out reference, read rather than computed again.
    """
    total, rows = 0.0, 0
    batches = held_out.batches() if batches is None else batches
    whole = held_out.targets is held_out.reference  # read once when on disk
    with torch.no_grad():
        for index, (batch, reference) in enumerate(zip(batches, held_out.reference,
                                                       strict=True)):
            targets = reference if whole else held_out.targets[index]
            outputs = reference if student is None else run_outputs(student, batch)
            if meter is not None:
                meter.add(outputs, reference, batch)
            count = reference[0].shape[0]
            total += float(distillation_loss(outputs, targets, kinds)) * count
            rows += count
    return total / max(1, rows)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def _schedule(config: FinetuneConfig, summary: FinetuneSummary):
    """Return the learning rate's factor at each step: a linear warm-up, then a cosine that
    ends at `summary.schedule_steps` (`finetune.steps`, or where a time budget will stop); and
    after a roll-back (the last in `summary.history`), the warm-up again from there: AdamW's
    moments are cleared then, and its first steps would move every number by the full rate, as
    a run's first steps would without the warm-up."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, summary.schedule_steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
        since = _rolled_back_at(summary.history)
        if since is None or not since <= step < since + warmup:
            return cosine
        return cosine * (step - since + 1) / (warmup + 1)
    return factor


def _rolled_back_at(history: list[dict]) -> int | None:
    """Return the step of the last roll-back in a held-out `history`, or None."""
    return next((entry["step"] for entry in reversed(history) if "backoff" in entry), None)


def _rate_now(optimizer: torch.optim.Optimizer, scheduler, rate: Callable[[int], float]) -> None:
    """Set each group's learning rate for the coming step to `rate` at the scheduler's count
    (`LambdaLR` sets it at its next step only: a roll-back's halving and warm-up would wait a
    step, the first with AdamW's moments cleared)."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * rate(scheduler.last_epoch)


def relative_lr(config: FinetuneConfig, language_model: bool) -> float:
    """Return the peak learning rate over a θ tensor's RMS that `config.relative_lr` gives
    (auto: `RELATIVE_LR`, or `LANGUAGE_MODEL_RELATIVE_LR` for a causal language model)."""
    if config.relative_lr != "auto":
        return float(config.relative_lr)
    return LANGUAGE_MODEL_RELATIVE_LR if language_model else RELATIVE_LR


def parameter_groups(params: list[nn.Parameter], config: FinetuneConfig,
                     language_model: bool = False) -> list[dict]:
    """Return AdamW parameter groups: one learning rate for all (`lr` set), or by default a
    learning rate per tensor proportional to its scale (`relative_lr` × RMS of its values).

    Adam moves every number by about the learning rate per step, whatever its gradient: a
    relative rate moves each θ tensor by a fixed fraction of its own size, which suits
    pretrained weights of any scale (an absolute 1e-3 is a 5 % step on weights of RMS 0.02).
    """
    if config.lr is not None:
        return [{"params": params, "lr": config.lr}]
    relative, groups = relative_lr(config, language_model), []
    for param in params:
        rms = float(param.detach().float().pow(2).mean().sqrt()) if param.numel() else 0.0
        groups.append({"params": [param], "lr": relative * max(rms, 1e-6)})
    return groups


def _teacher_targets(teacher: nn.Module, train: Dataset, device: torch.device,
                     held_out: HeldOut) -> TeacherTargets | None:
    """Return the training targets (`held_out.compact` of the original's outputs), each
    sample's made when a step first draws it, when they fit in memory for every training
    sample, else None (the original then runs at every step).
    The original runs on as many samples at a time as fit in the cache's size whole."""
    outputs = run_outputs(teacher, _to(train.take(torch.arange(1)), device))
    probe = held_out.compact(outputs)
    if target_bytes(probe) * len(train) > _TEACHER_CACHE_BYTES:
        return None
    return TeacherTargets(lambda index: held_out.compact(run_outputs(
        teacher, _to(train.take(index), device))), len(train), probe,
        chunk=max(1, min(64, _TEACHER_CACHE_BYTES // max(1, _nbytes(outputs)))))


def samples_per_step(config: FinetuneConfig, train: Dataset,
                     device: torch.device) -> tuple[int, int | None]:
    """Return how many samples a step takes, and the tokens they hold when the inputs are text
    (an `input_ids` input: its second dimension is the window's length), else None.

    `batch_size` samples, or fewer when they would hold more than `tokens_per_step` tokens
    (auto: `_CPU_TOKENS_PER_STEP` on the CPU, no limit elsewhere); one at least, and never more
    than the training split holds."""
    samples = min(config.batch_size, len(train))
    ids = train.inputs.get("input_ids")
    if ids is None or ids.dim() < 2:
        return samples, None
    length = ids.shape[1]
    limit = config.tokens_per_step
    if limit == "auto":
        limit = _CPU_TOKENS_PER_STEP if device.type == "cpu" else None
    if limit is not None:
        samples = max(1, min(samples, int(limit) // length))
    return samples, samples * length


def free_memory_bytes(device: torch.device) -> int | None:
    """Return the memory still free on `device` (None when it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory_bytes() if device.type == "cpu" else None


def training_forward(student: nn.Module, train: Dataset, config: FinetuneConfig,
                     device: torch.device, params: list[nn.Parameter],
                     summary: FinetuneSummary) -> Callable[[dict], list[torch.Tensor]]:
    """Return the forward pass a training step runs: with the blocks checkpointed when
    `config.activation_checkpointing` says so (auto: when `checkpointing.wanted`), else plain.
    Records the choice, and the activations a plain step keeps, in `summary`."""
    def plain(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return run_outputs(student, batch)

    runner = BlockCheckpointing(student) if isinstance(student, fx.GraphModule) else None
    if runner is None or not runner.blocks:
        return plain
    activations, outputs = _step_activation_bytes(plain, student, train, summary, device)
    summary.activation_bytes_per_step = activations
    summary.step_bytes = activations + _OUTPUT_COPIES * outputs
    if config.activation_checkpointing == "off":
        return plain
    theta_bytes = _nbytes(params)
    if config.activation_checkpointing == "auto" and not wanted(
            activations, theta_bytes, free_memory_bytes(device)):
        return plain
    summary.activation_checkpointing = True
    summary.step_bytes = 2 * activations // len(runner.blocks) + _OUTPUT_COPIES * outputs
    return runner


def unaffordable(summary: FinetuneSummary, params: list[nn.Parameter],
                 free_bytes: int | None) -> str | None:
    """Return why training `params` cannot fit in `free_bytes`, or None when it can (or the
    free memory is unknown).

    Training holds, beside the model, four tensors the size of θ (its gradients, AdamW's two
    moments and the best θ seen) and what a step holds (`summary.step_bytes`); a tenth of the
    free memory is left for the allocator. Running out halfway would have the job killed by
    the kernel and its calibration lost; the steps are skipped instead and the job goes on
    with θ as initialized, saying why."""
    theta_bytes = _nbytes(params)
    needed = _TRAINING_COPIES * theta_bytes + (summary.step_bytes or 0)
    if free_bytes is None or needed <= _TRAINING_FREE_SHARE * free_bytes:
        return None
    kept = ("" if not summary.step_bytes
            else f"; a step's activations and outputs {format_bytes(summary.step_bytes)}")
    return (f"fine-tuning skipped: its {summary.steps} steps need about {format_bytes(needed)} "
            f"more memory on {summary.device} ({_TRAINING_COPIES} × θ's "
            f"{format_bytes(theta_bytes)}: gradients, AdamW's two moments, the best θ{kept}) "
            f"and {format_bytes(free_bytes)} is free, of which training plans on "
            f"{_TRAINING_FREE_SHARE:.0%} ({format_bytes(_TRAINING_FREE_SHARE * free_bytes)}, "
            "the rest is the allocator's slack); θ stays as initialized. Run the job on a "
            "GPU worker or a machine with more memory, lower finetune.batch_size (or "
            "tokens_per_step) or the ratio, "
            "or set finetune.steps 0 to skip it on purpose")


def _step_activation_bytes(forward: Callable[[dict], list[torch.Tensor]], student: nn.Module,
                           train: Dataset, summary: FinetuneSummary,
                           device: torch.device) -> tuple[int, int]:
    """Return the activations a plain training step keeps, from forward passes on one sample
    and on two (what one more sample adds times the batch, plus what does not grow with it:
    each W = f(θ), computed once per step), and the bytes of a step's outputs."""
    batch = summary.samples_per_step
    kept, output_bytes = [], []

    def measured(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outputs = forward(inputs)
        output_bytes.append(_nbytes(outputs))
        return outputs

    for count in (1, 2)[:min(2, len(train))]:
        probe = _to(train.take(torch.arange(count)), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            kept.append(saved_activation_bytes(measured, probe, student))
    outputs = output_bytes[0] * batch
    if len(kept) == 1:
        return kept[0] * batch, outputs
    per_sample = max(0, kept[1] - kept[0])
    return kept[0] - per_sample + per_sample * batch, outputs


def finetune_(student: nn.Module, plan: Plan, lesson: Distillation, config: FinetuneConfig,
              control: JobControl, device: torch.device = _CPU,
              initial_score: float | None = None,
              checkpoints: FinetuneCheckpoints | None = None) -> FinetuneSummary:
    """Distill `lesson.teacher` into the parametrized `student` in place; keep the best θ seen.

    With `config.quantization_aware`, the student's compact form trains (and is scored) under
    onnxruntime's int8 arithmetic, simulated (`compressor.finetune.quantization_aware`); its θ
    is the student's.

    The student, the teacher and the held-out reference outputs are on `device`. When a
    held-out evaluation comes out clearly worse than the best so far (the learning rate is too
    high for this model), θ goes back to the best state, the learning rate is halved and warms
    up again.
    `initial_score` may give the student's held-out score as it is (`held_out_score`),
    computed elsewhere.

    With `checkpoints`, the run's whole state is kept every `checkpoint_every` steps or
    `checkpoint_minutes` (and when it ends), and a run that finds a checkpoint made for the
    same inputs goes on from it: same θ at the end as a run never stopped.

    With a time budget (`control.budget`), a step is taken only when the budget left, less
    what export, verification and the report need, covers one more step at the pace so far
    (the first only when anything is left at all); a run cut short is scored on the held-out
    split where it stopped, keeps the best θ as always, and says so (`cut_by_budget`).
    """
    teacher, train, kinds, held_out = lesson.teacher, lesson.train, lesson.kinds, lesson.held_out
    if config.quantization_aware:  # θ trains through int8 as onnxruntime will compute it
        student, params = quantization_aware(student, teacher, plan, config.train_biases,
                                             lesson.int8_input_scales)
        initial_score = None  # the float student's score is not the simulated one's
    else:
        params = trainable_parameters(student, plan, config.train_biases)
    eval_batches = [_to(b, device) for b in held_out.batches()]
    budget = control.budget
    scoring_s, scoring_started = lesson.scoring_s, budget.elapsed_s()
    if initial_score is None:
        best = held_out_score(student, held_out, kinds, batches=eval_batches)
        scoring_s = budget.elapsed_s() - scoring_started
    else:
        best = initial_score
    summary = FinetuneSummary(config.steps, str(device), best, best, 0,
                              quantization_aware=config.quantization_aware)
    summary.samples_per_step, summary.tokens_per_step = samples_per_step(config, train, device)
    summary.logits_top_k = kept_k(held_out.targets[0]) if held_out.targets else None
    if config.steps == 0 or not params:
        return summary
    blockwise, cached = _blockwise(student, teacher, config, summary), None
    if blockwise is None:
        with torch.no_grad():
            cached = _teacher_targets(teacher, train, device, held_out)
        summary.teacher_outputs_cached = cached is not None
        forward = training_forward(student, train, config, device, params, summary)
    summary.skipped = unaffordable(summary, params, free_memory_bytes(device))
    if summary.skipped is not None:
        return summary
    best_state = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(parameter_groups(params, config, lesson.language_model),
                                  weight_decay=config.weight_decay)
    if config.lr is None:
        summary.relative_lr = relative_lr(config, lesson.language_model)
    lr_scale = 1.0
    summary.schedule_steps = config.steps
    schedule = _schedule(config, summary)

    def rate(scheduled: int) -> float:
        return lr_scale * schedule(scheduled)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(config.seed)
    resumed = None if checkpoints is None else checkpoints.load(params)
    step = 0  # the last step taken
    if resumed is not None:
        best_state = resumed.restore_(params, optimizer, scheduler, generator, device)
        best, lr_scale, step = resumed.best, resumed.lr_scale, resumed.step
        summary.best_step, summary.history = resumed.best_step, resumed.history
        summary.floor_kept_at = next((e["step"] for e in summary.history
                                      if e.get("note") == FLOOR_KEPT), None)
        summary.resumed_at_step = step
        if cached is not None:  # what the steps before drew: made in the batches they were
            cached.drawn_before(sampled_indices(len(train), step, summary.samples_per_step,
                                                config.seed))
        checkpoints.log(_resumed_message(resumed, config.steps))
        control.report("finetuning", step / config.steps, f"resumed at step {step}")
        if checkpoints.on_resume is not None:
            checkpoints.on_resume(
                "the finished fine-tuning run" if resumed.finished else "fine-tuning's state",
                f"fine-tuning step {step} of {config.steps}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started, first = time.monotonic(), step + 1
    budget_started = budget.elapsed_s()
    for step in range(first, config.steps + 1 if resumed is None or not resumed.finished
                      else first):
        pace = (budget.elapsed_s() - budget_started) / max(1, step - first)
        # after the first step, a step is taken only with time for it and for the two held-out
        # passes a stop for the budget is followed by: θ where it stopped scored, then the best
        # θ's figures (`finetune.stage`; Gemma-3 270M: ~30 s each)
        last_pass = 2 * scoring_s if step > first else 0.0
        if budget.limited and step > first:  # the cosine ends where the budget will stop
            affordable = int(max(0.0, budget.left_s() - budget.reserve_s - last_pass)
                             / max(pace, 1e-9))
            summary.schedule_steps = min(config.steps, step - 1 + affordable)
        if not budget.affords(pace + last_pass):  # the first step: while anything is left
            summary.cut_by_budget = _cut(step - 1, config.steps, pace, budget, last_pass)
            step -= 1  # the last step taken
            scored = bool(summary.history) and summary.history[-1]["step"] == step
            if step >= first and not scored:  # θ where it stopped may be the best
                current = held_out_score(student, held_out, kinds, batches=eval_batches)
                summary.history.append({"step": step, "held_out": current, "note": "budget"})
                if current < best:
                    best, summary.best_step = current, step
                    best_state = [p.detach().clone() for p in params]
            break
        index = next_draw(generator, len(train), summary.samples_per_step)
        batch = _to(train.take(index), device)
        optimizer.zero_grad(set_to_none=True)
        if blockwise is not None:
            with autocast:
                loss = blockwise(batch)  # each block's loss backpropagated as it is computed
        else:
            if cached is not None:  # in float32, as they are kept
                with torch.no_grad():
                    targets = cached.take(index)
            with autocast:
                if cached is None:
                    with torch.no_grad():
                        targets = held_out.compact(run_outputs(teacher, batch))
                outputs = forward(batch)
                chunked = summary.activation_checkpointing or larger_than_a_chunk(outputs)
                loss = None if chunked else distillation_loss(outputs, targets, kinds)
            if loss is None:  # saving memory: the loss's softmaxes too, a chunk of rows at a time
                loss = distillation_backward(outputs, targets, kinds)
            else:
                loss.backward()
            del outputs, targets
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            summary.history.append({"step": step, "loss": loss_value, "note": "diverged"})
            break
        if step % config.eval_every == 0 or step == config.steps:
            meter = None if lesson.enough is None else FidelityMeter(
                kinds, lesson.enough.next_token)
            scoring_started = budget.elapsed_s()
            current = held_out_score(student, held_out, kinds, meter, batches=eval_batches)
            scoring_s = budget.elapsed_s() - scoring_started
            entry = {"step": step, "loss": loss_value, "held_out": current}
            if current < best:
                best, summary.best_step = current, step
                best_state = [p.detach().clone() for p in params]
                enough = lesson.enough
                if meter is not None and step < config.steps and enough.kept(meter.result()) and (
                        enough.shipped is None or enough.shipped()):
                    summary.floor_kept_at = step
                    entry["note"] = FLOOR_KEPT
            elif (lesson.enough is not None and lesson.enough.kept_as_initialized
                  and summary.best_step == 0 and step < config.steps):
                # no step improved on θ as initialized, which keeps the floor: more steps are
                # not needed to ship it (a random-weight BERT-base's finalist trained 50 steps
                # of 5 s under a 20-minute budget, its held-out loss never below step 0's)
                summary.floor_kept_at = step
                entry["note"] = FLOOR_KEPT
            elif current > best * (1 + _BACKOFF_MARGIN):
                _restore(params, best_state)
                optimizer.state.clear()
                lr_scale /= 2
                entry["backoff"] = f"rolled back to step {summary.best_step}, lr × {lr_scale:g}"
            summary.history.append(entry)
            if "backoff" in entry:  # halved, and warming up again, from the next step on
                _rate_now(optimizer, scheduler, rate)
        kept_now = checkpoints is not None and step < config.steps and checkpoints.due(step)
        if kept_now:
            checkpoints.save(TrainingState.capture(
                step=step, finished=False, params=params, best_theta=best_state, best=best,
                best_step=summary.best_step, lr_scale=lr_scale, history=summary.history,
                optimizer=optimizer, sampler=generator, device=device))
        left = time_left(time.monotonic() - started, step - first + 1, config.steps - first + 1)
        try:
            control.report("finetuning", step / config.steps,
                           f"step {step}/{config.steps}{left}", loss_value)
        except InterruptedJobError:  # to be run again: the retry goes on after this step
            if checkpoints is not None and not kept_now:
                checkpoints.log(f"fine-tuning stopped after step {step} to be run again: "
                                "checkpoint kept first")
                checkpoints.save(TrainingState.capture(
                    step=step, finished=step in (config.steps, summary.floor_kept_at),
                    params=params,
                    best_theta=best_state, best=best, best_step=summary.best_step,
                    lr_scale=lr_scale, history=summary.history, optimizer=optimizer,
                    sampler=generator, device=device))
            raise
        if summary.floor_kept_at == step:
            break
    if checkpoints is not None and (resumed is None or not resumed.finished):
        checkpoints.save(TrainingState.capture(  # a retry interrupted later skips training
            step=step, finished=True, params=params, best_theta=best_state, best=best,
            best_step=summary.best_step, lr_scale=lr_scale, history=summary.history,
            optimizer=optimizer, sampler=generator, device=device))
    _restore(params, best_state)
    summary.best_score, summary.steps_run = best, step
    summary.teacher_samples = 0 if cached is None else cached.made
    return summary


def _blockwise(student: nn.Module, teacher: nn.Module, config: FinetuneConfig,
               summary: FinetuneSummary) -> BlockwiseLoss | None:
    """Return the block-wise loss a step minimizes (`finetune.distill: blocks`), or None: the
    outputs' (asked for, or, recorded in `summary.distill_note`, the only one that applies)."""
    if config.distill != "blocks":
        return None
    if config.quantization_aware:
        summary.distill_note = ("finetune.distill 'blocks': θ trains through int8 here, which "
                                "is simulated on the whole model; distilled on its outputs")
        return None
    loss = (BlockwiseLoss(student, teacher) if isinstance(student, fx.GraphModule)
            and isinstance(teacher, fx.GraphModule) else None)
    if loss is None or not loss.segments:
        summary.distill_note = ("finetune.distill 'blocks': the model has no repeated blocks "
                                "(layers.0, layers.1, ...); distilled on its outputs")
        return None
    summary.blocks_distilled = loss.blocks
    return loss


def _cut(last: int, steps: int, pace: float, budget, scoring_s: float = 0.0) -> str:
    """Record in `budget` that fine-tuning stopped after step `last` of `steps`; return why
    (`scoring_s`: the seconds kept for the held-out passes after it)."""
    budget.cut(f"fine-tuning stopped at step {last} of {steps}")
    pace_text = f"a step takes {pace:.2g} s, " if last > 0 else ""
    if scoring_s > 0:
        pace_text += f"the held-out passes after it {scoring_s:.2g} s, "
    return (f"fine-tuning stopped at step {last} of {steps} to fit the time budget "
            f"({budget.describe()}; {pace_text}{budget.reserve_s:.0f} s are kept for export, "
            "verification and the report); raise max_minutes for all the steps")


def _resumed_message(state: TrainingState, steps: int) -> str:
    reused = (f"θ, AdamW's state, the best θ (step {state.best_step}), the learning-rate "
              "back-off, the random states and the held-out history")
    if state.finished:
        return (f"fine-tuning: a finished run was kept (step {state.step} of {steps}); reused "
                f"{reused}: no step is taken again")
    return (f"fine-tuning: resumed after step {state.step} of {steps} from its checkpoint; "
            f"reused {reused}")


def time_left(elapsed_s: float, done: int, total: int) -> str:
    """Return ', about 3.2 h left' for `total - done` more steps at the pace so far, or ''
    when none are left (a billion-parameter model's step takes minutes on a CPU)."""
    if done >= total or done <= 0:
        return ""
    seconds = elapsed_s / done * (total - done)
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f", about {seconds / size:.1f} {unit} left"
    return f", about {seconds:.0f} s left"


def _nbytes(tensors) -> int:
    """Return the bytes of `tensors` (an iterable of tensors or parameters)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _restore(params: list[nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, saved in zip(params, state, strict=True):
            param.copy_(saved)
