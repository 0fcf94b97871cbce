"""The original's outputs a run distills on, kept for the training split, each sample's made
the first time a step draws it.

Fine-tuning runs the original on a training sample once, not at every step that draws it. Made
for the whole split before the first step, they cost a run that takes few steps as much as one
that takes hundreds: a target-mode finalist that the time budget left 8 steps of 8 samples on
Gemma-3 270M waited minutes for the original's top 64 on all 505 of its training windows, and
read 64. So a sample's targets are made when a step first draws it.

The samples a step draws for the first time are run together, as one batch, so a sample's
targets are always made in the same batch: a run resumed from a checkpoint (its kept targets
gone) makes the samples the steps before it drew in the batches those steps made them in (the
seeded sampler draws them again), and the very numbers the uninterrupted run made. A long run
still runs the original once per sample, in batches of a step's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.runtime.objectives import Target
from compressor.runtime.top_logits import TopLogits

# A sample no step draws is first drawn at this step.
_NEVER = torch.iinfo(torch.int64).max


def sampled_indices(samples: int, steps: int, per_step: int, seed: int) -> torch.Tensor:
    """Return the samples each of the first `steps` steps draws, (steps, per_step): what
    fine-tuning's sampler, seeded with `seed`, draws one step at a time from a split of
    `samples`."""
    generator = torch.Generator().manual_seed(seed)
    if steps == 0:
        return torch.zeros(0, per_step, dtype=torch.int64)
    return torch.stack([next_draw(generator, samples, per_step) for _ in range(steps)])


def next_draw(generator: torch.Generator, samples: int, per_step: int) -> torch.Tensor:
    """Return the samples fine-tuning's next step draws from a split of `samples`."""
    return torch.randint(0, samples, (per_step,), generator=generator)


def first_drawn(samples: int, draws: torch.Tensor) -> torch.Tensor:
    """Return, for each of `samples`, the first step (counted from 0) of `draws` that draws it,
    or `_NEVER`."""
    steps = torch.arange(draws.shape[0]).repeat_interleave(draws.shape[1])
    first = torch.full((samples,), _NEVER, dtype=torch.int64)
    return first.scatter_reduce_(0, draws.flatten(), steps, reduce="amin")


class TeacherTargets:
    """The training targets of a split of `samples` samples, made on demand by `run` (the
    original's targets on the samples at an index), `chunk` samples a run at most, and kept:
    each step's (`take`) samples not drawn before together. `probe`: one sample's targets, to
    size them by."""

    def __init__(self, run: Callable[[torch.Tensor], list[Target]], samples: int,
                 probe: list[Target], chunk: int):
        self._run, self._chunk = run, chunk
        self._kept = [_empty(target, samples) for target in probe]
        self._made = torch.zeros(samples, dtype=torch.bool)
        self._first = torch.full((samples,), _NEVER, dtype=torch.int64)
        self._steps = 0

    def drawn_before(self, draws: torch.Tensor) -> None:
        """Say what the steps a resumed run took before drew, (steps, per_step)
        (`sampled_indices`): a sample they drew is made in the batch its first step made it in
        when a step draws it again."""
        self._first = first_drawn(len(self._first), draws)
        self._steps = draws.shape[0]

    @property
    def made(self) -> int:
        """How many samples' targets have been made."""
        return int(self._made.sum())

    def take(self, index: torch.Tensor) -> list[Target]:
        """Return the targets of the samples a step draws (`index`), making those not made
        yet: those an earlier step drew with that step's, the others together."""
        missing = index[~self._made[index]].unique()
        earlier = self._first[missing]
        for step in earlier[earlier != _NEVER].unique().tolist():
            self._keep((self._first == step).nonzero().flatten())
        new = missing[earlier == _NEVER]
        if len(new):
            self._first[new] = self._steps
            self._keep(new)
        self._steps += 1
        return [_rows(kept, index) for kept in self._kept]

    def _keep(self, samples: torch.Tensor) -> None:
        for part in samples.split(self._chunk):
            for kept, made in zip(self._kept, self._run(part), strict=True):
                _put(kept, part, made)
        self._made[samples] = True


def _empty(target: Target, samples: int) -> Target:
    """Return room for `samples` samples' worth of targets shaped like `target`'s rows."""
    def like(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.new_empty((samples, *tensor.shape[1:]))
    if isinstance(target, TopLogits):
        return TopLogits(like(target.log_probs), like(target.indices), like(target.rest),
                         target.classes, target.temperature)
    return like(target)


def _put(kept: Target, samples: torch.Tensor, part: Target) -> None:
    if isinstance(kept, TopLogits):
        for store, rows in ((kept.log_probs, part.log_probs), (kept.indices, part.indices),
                            (kept.rest, part.rest)):
            store[samples.to(store.device)] = rows
    else:
        kept[samples.to(kept.device)] = part


def _rows(kept: Target, index: torch.Tensor) -> Target:
    return kept[index.to(kept.device)]
