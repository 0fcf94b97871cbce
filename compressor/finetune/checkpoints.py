"""Fine-tuning checkpoints: a run's whole state, kept every N steps or M minutes for a retry.

A checkpoint holds what the loop needs to go on from its step exactly as if it had never
stopped: θ, AdamW's state (each tensor's two moments and step count, each group's learning
rates), the best θ so far with its held-out score and step, the learning rate's back-off
factor, the held-out history, and the random states (the batch sampler's, torch's CPU
generator's, and CUDA's when training there). A run that ended keeps a last one marked
finished, so a retry interrupted after fine-tuning (in the export, say) skips the training.

A checkpoint is a product of `compressor.runtime.resume`: tensors in safetensors, the rest in
JSON, written atomically, keyed by the job's inputs, the plan and the fine-tuning settings,
and discarded (logged) unless its key, its files and every tensor's shape and dtype check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compressor.config import FinetuneConfig
from compressor.plan.planning import Plan
from compressor.runtime.memory import format_bytes
from compressor.runtime.resume import (
    ResumeFolder,
    UntrustedProduct,
    fitting,
    read_product,
    write_product,
)

# Settings that decide when checkpoints are written, not what training computes.
_CADENCE_FIELDS = {"checkpoint_every", "checkpoint_minutes"}


@dataclass
class TrainingState:
    """A fine-tuning run as it stands after `step` (`finished`: the run is over)."""

    step: int
    finished: bool
    theta: list[torch.Tensor]
    best_theta: list[torch.Tensor]
    best: float  # the best held-out score so far, that of `best_theta`
    best_step: int
    lr_scale: float  # the back-off factor on the schedule's learning rate
    history: list[dict]
    optimizer: dict[str, Any]  # AdamW's `state_dict()`
    sampler: torch.Tensor  # the batch sampler's generator state
    cpu_rng: torch.Tensor  # torch's default CPU generator state
    cuda_rng: torch.Tensor | None = None  # the training device's, when it is CUDA
    device: str = "cpu"

    @classmethod
    def capture(cls, *, step: int, finished: bool, params: list[nn.Parameter],
                best_theta: list[torch.Tensor], best: float, best_step: int, lr_scale: float,
                history: list[dict], optimizer: torch.optim.Optimizer,
                sampler: torch.Generator, device: torch.device) -> TrainingState:
        """Return the run's state now (tensors as they are: `FinetuneCheckpoints.save` copies
        them to the file before training goes on)."""
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(step, finished, [p.detach() for p in params], list(best_theta), best,
                   best_step, lr_scale, list(history), optimizer.state_dict(),
                   sampler.get_state(), torch.get_rng_state(), cuda_rng, str(device))

    def restore_(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, sampler: torch.Generator,
                 device: torch.device) -> list[torch.Tensor]:
        """Put θ, the optimizer, the schedule's position and the random states back as they
        were after `step`; return the best θ, on the parameters' device."""
        with torch.no_grad():
            for param, saved in zip(params, self.theta, strict=True):
                param.copy_(saved)
        optimizer.load_state_dict(self.optimizer)
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        scheduler.last_epoch = self.step
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        sampler.set_state(self.sampler)
        torch.set_rng_state(self.cpu_rng)
        if device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        return [saved.to(param.device) for param, saved in zip(params, self.best_theta,
                                                                strict=True)]


class FinetuneCheckpoints:
    """Where one fine-tuning run keeps its checkpoint, when it writes one, and reading it back.

    `key` is what the checkpoint must have been made for; `log` gets a line per checkpoint
    written, found or discarded.
    """

    def __init__(self, folder: Path, key: str, every_steps: int, every_s: float,
                 log: Callable[[str], None], reserve: int | None = None) -> None:
        self.folder = folder
        self.key = key
        self.every_steps = every_steps
        self.every_s = every_s
        self.log = log
        self.reserve = reserve  # disk a checkpoint leaves free for the artifacts (`write_product`)
        # Told (what was reused, where the job resumed) when the run goes on from a checkpoint.
        self.on_resume: Callable[[str, str], None] | None = None
        self.enabled = True  # off once the disk cannot take them
        self._last = time.monotonic()

    @classmethod
    def for_run(cls, resume: ResumeFolder, plan: Plan, config: FinetuneConfig,
                log: Callable[[str], None]) -> FinetuneCheckpoints | None:
        """Return the checkpoints of the run that fine-tunes `plan` with `config` among the
        job's kept products (None when `config.checkpoint_every` is 0: none are kept).

        A run is told apart from the job's others (target mode fine-tunes several candidates)
        by its plan and settings, which its key covers too.
        """
        if not config.checkpoint_every:
            return None
        settings = config.model_dump(mode="json", exclude=_CADENCE_FIELDS)
        run = json.dumps({"plan": plan.to_dict(), "finetune": settings}, sort_keys=True,
                         default=str)
        slot = hashlib.sha256(run.encode()).hexdigest()[:16]
        return cls(resume.product(f"finetune-{slot}"), resume.key("finetune", run),
                   config.checkpoint_every, 60 * config.checkpoint_minutes, log,
                   resume.reserve_bytes)

    def due(self, step: int) -> bool:
        """Return whether a checkpoint is due after `step`: every N steps or M minutes."""
        return self.enabled and (step % self.every_steps == 0
                                 or time.monotonic() - self._last >= self.every_s)

    def _turn_off(self, reason: str) -> None:
        self.enabled = False
        self.log(f"fine-tuning checkpoints off for the rest of this run: {reason}; a retry goes "
                 "on from the last one kept, if any")

    def save(self, state: TrainingState) -> None:
        """Write `state` as the run's checkpoint (atomically, replacing the previous one).

        A checkpoint the disk cannot take turns checkpoints off for the rest of the run (the
        log says why) instead of failing the job: only a retry would lose by it.
        """
        if not self.enabled:
            return
        started = time.monotonic()
        tensors = {f"theta.{i}": t for i, t in enumerate(state.theta)}
        tensors.update({f"best.{i}": t for i, t in enumerate(state.best_theta)})
        groups = []
        for index, moments in state.optimizer["state"].items():
            for name, value in moments.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name!r} is not a tensor: {value!r}")
                tensors[f"optimizer.{index}.{name}"] = value
        for group in state.optimizer["param_groups"]:
            groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
        tensors["rng.sampler"] = state.sampler
        tensors["rng.cpu"] = state.cpu_rng
        if state.cuda_rng is not None:
            tensors["rng.cuda"] = state.cuda_rng
        record = {"step": state.step, "finished": state.finished, "best": state.best,
                  "best_step": state.best_step, "lr_scale": state.lr_scale,
                  "history": state.history, "optimizer_groups": groups, "device": state.device,
                  "theta": [[list(t.shape), str(t.dtype)] for t in state.theta]}
        try:
            size = write_product(self.folder, self.key, tensors, record, self.reserve)
        except OSError as exc:  # a full disk, say: the job goes on, only its retry loses
            self._turn_off(f"one was not written ({exc.strerror or exc})")
            return
        self._last = time.monotonic()
        self.log(f"fine-tuning checkpoint at step {state.step}"
                 f"{' (finished)' if state.finished else ''}: {format_bytes(size)} in "
                 f"{self._last - started:.2f} s")

    def load(self, params: list[nn.Parameter]) -> TrainingState | None:
        """Return the run's checkpoint, or None when there is none or it cannot be trusted
        (then it is deleted and the log says why)."""
        try:
            found = read_product(self.folder, self.key)
            return None if found is None else _read_state(*found, params)
        except UntrustedProduct as exc:
            self.log(f"fine-tuning checkpoint in {self.folder.parent.name}/{self.folder.name} "
                     f"discarded: {exc}; fine-tuning starts from its first step")
            shutil.rmtree(self.folder, ignore_errors=True)
            return None


def _read_state(path: Path, record: dict[str, Any], params: list[nn.Parameter]) -> TrainingState:
    """Return the state in a checked product; raise `UntrustedProduct` unless it fits `params`."""
    expected = [[list(p.shape), str(p.dtype)] for p in params]
    if record.get("theta") != expected:
        raise UntrustedProduct(f"its θ ({len(record.get('theta') or [])} tensors) does not fit "
                               f"this run's ({len(params)} tensors, or their shapes differ)")
    try:
        with safe_open(str(path), framework="pt") as kept:
            names = set(kept.keys())
            theta = [fitting(kept.get_tensor(f"theta.{i}"), p) for i, p in enumerate(params)]
            best = [fitting(kept.get_tensor(f"best.{i}"), p) for i, p in enumerate(params)]
            moments: dict[int, dict[str, torch.Tensor]] = {}
            for name in sorted(n for n in names if n.startswith("optimizer.")):
                _, index, field = name.split(".", 2)
                moments.setdefault(int(index), {})[field] = kept.get_tensor(name)
            random = {n: kept.get_tensor(f"rng.{n}") for n in ("sampler", "cpu", "cuda")
                      if f"rng.{n}" in names}
        groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()}
                  for group in record["optimizer_groups"]]
        if sorted(i for group in groups for i in group["params"]) != list(range(len(params))):
            raise UntrustedProduct("its optimizer groups do not cover this run's θ")
        for index, state in moments.items():
            for field in ("exp_avg", "exp_avg_sq"):
                if field in state:
                    fitting(state[field], params[index])
        return TrainingState(
            int(record["step"]), bool(record["finished"]), theta, best, float(record["best"]),
            int(record["best_step"]), float(record["lr_scale"]), list(record["history"]),
            {"state": moments, "param_groups": groups}, random["sampler"], random["cpu"],
            random.get("cuda"), str(record["device"]))
    except (KeyError, ValueError, TypeError, IndexError, UntrustedProduct) as exc:
        if isinstance(exc, UntrustedProduct):
            raise
        raise UntrustedProduct(f"it does not hold a whole fine-tuning state ({exc!r})") from None
